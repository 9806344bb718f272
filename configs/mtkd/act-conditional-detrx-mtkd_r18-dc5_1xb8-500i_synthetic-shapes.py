# MTKD on the embedded dataset: fine-tune the small Conditional DETR-DC5-R18 of
# configs/conditional_detr with the ACT encoder of configs/act (same ACT settings), both branches
# trained on the ground truth, ACT's boxes distilled towards the exact branch's (docs/mtkd.md).
#   python tools/test.py  configs/mtkd/act-conditional-detrx-mtkd_r18-dc5_1xb8-500i_synthetic-shapes.py CKPT
#   python tools/train.py configs/mtkd/act-conditional-detrx-mtkd_r18-dc5_1xb8-500i_synthetic-shapes.py
# Both report act/bbox_mAP (ACT branch) and full/bbox_mAP (exact attention, same weights).
_base_ = [
    '../act/act-conditional-detrx_r18-dc5_1xb8-3000i_synthetic-shapes.py', '../_base_/mtkd.py'
]

# The exact model trained by configs/conditional_detr/conditional-detrx_r18-dc5_1xb8-3000i_*.py
pretrained_detr = 'work_dirs/cond_detr_r18-dc5_synthetic/iter_3000.pth'
load_from = pretrained_detr

model = dict(type='MTKDConditionalDETR', **_base_.mtkd_model)

# Short fine-tune at constant lr (_base_/mtkd.py).
max_iters = 500
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(checkpoint=dict(interval=max_iters))
optim_wrapper = _base_.mtkd_synthetic_shapes_optim_wrapper
param_scheduler = _base_.mtkd_constant_lr
val_evaluator = [dict(_base_.val_evaluator, prefix='act'),
                 dict(_base_.val_evaluator, **_base_.mtkd_full_branch_metric)]
test_evaluator = val_evaluator
