# MTKD on the embedded dataset: fine-tune the small exact DETR-DC5-R18 of configs/detr with the
# ACT encoder of configs/act (same ACT settings), both branches trained, boxes distilled.
#   python tools/test.py  configs/mtkd/act-detr-mtkd_r18-dc5_1xb8-300i_synthetic-shapes.py DETR_CKPT
#   python tools/train.py configs/mtkd/act-detr-mtkd_r18-dc5_1xb8-300i_synthetic-shapes.py
# Both report act/bbox_mAP (ACT branch) and full/bbox_mAP (exact attention, same weights).
_base_ = ['../act/act-detr_r18-dc5_1xb8-3000i_synthetic-shapes.py', '../_base_/mtkd.py']

# What `python tools/train.py configs/detr/detr_r18-dc5_1xb8-3000i_synthetic-shapes.py` writes.
pretrained_detr = 'work_dirs/detr_r18-dc5_1xb8-3000i_synthetic-shapes/iter_3000.pth'
load_from = pretrained_detr

model = dict(type='MTKDDETR', **_base_.mtkd_model)

# Short fine-tune at constant lr (_base_/mtkd.py).
max_iters = 300
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(checkpoint=dict(interval=max_iters))
optim_wrapper = _base_.mtkd_synthetic_shapes_optim_wrapper
param_scheduler = _base_.mtkd_constant_lr
val_evaluator = [dict(_base_.val_evaluator, prefix='act'),
                 dict(_base_.val_evaluator, **_base_.mtkd_full_branch_metric)]
test_evaluator = val_evaluator
