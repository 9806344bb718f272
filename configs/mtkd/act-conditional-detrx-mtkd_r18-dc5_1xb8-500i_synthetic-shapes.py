# MTKD on the embedded dataset: fine-tune the small Conditional DETR-DC5-R18 of
# configs/conditional_detr with the ACT encoder of configs/act (same ACT settings), both branches
# trained on the ground truth, ACT's boxes distilled towards the exact branch's (docs/mtkd.md).
#   python tools/test.py  configs/mtkd/act-conditional-detrx-mtkd_r18-dc5_1xb8-500i_synthetic-shapes.py CKPT
#   python tools/train.py configs/mtkd/act-conditional-detrx-mtkd_r18-dc5_1xb8-500i_synthetic-shapes.py
# Both report act/bbox_mAP (ACT branch) and full/bbox_mAP (exact attention, same weights).
_base_ = '../act/act-conditional-detrx_r18-dc5_1xb8-3000i_synthetic-shapes.py'

# The exact model trained by configs/conditional_detr/conditional-detrx_r18-dc5_1xb8-3000i_*.py
pretrained_detr = 'work_dirs/cond_detr_r18-dc5_synthetic/iter_3000.pth'
load_from = pretrained_detr

model = dict(
    type='MTKDConditionalDETR',
    act_loss_weight=1.0,
    full_loss_weight=1.0,
    loss_kd=dict(type='L2DistillLoss', loss_weight=1.0, reduction='batchmean'),
    detach_full=True,
    test_branch='both')

# Short fine-tune at the learning rate the pre-training schedule ends with (2e-4 decayed by 0.1).
max_iters = 500
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
optim_wrapper = dict(optimizer=dict(lr=2e-5))
param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False, begin=0, end=max_iters)]
default_hooks = dict(checkpoint=dict(interval=max_iters))

val_evaluator = [
    dict(type='CocoMetric', ann_file='data/synthetic_shapes/annotations/val.json',
         metric='bbox', format_only=False, prefix='act'),
    dict(type='BranchCocoMetric', pred_key='full_pred_instances',
         ann_file='data/synthetic_shapes/annotations/val.json', metric='bbox',
         format_only=False, prefix='full'),
]
test_evaluator = val_evaluator
