# Iteration-based training on one CPU (batch 8), shared by the embedded-dataset detectors of
# configs/demo and configs/detr: mmdet's default runtime with iteration-based loops, logs and
# checkpoints, and DETR's optimizer. A config adds max_iters, its lr schedule and intervals.
_base_ = 'mmdet::_base_/default_runtime.py'

train_cfg = dict(type='IterBasedTrainLoop')
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
# num_classes_check: dataset classes and head num_classes must agree, checked before the first
# iteration by any tool (mmdet's own included), naming both numbers and the keys to change.
default_hooks = dict(
    checkpoint=dict(type='CheckpointHook', by_epoch=False, max_keep_ckpts=2),
    num_classes_check=dict(type='NumClassesCheckHook'))
log_processor = dict(by_epoch=False)
# DETR's AdamW (weight decay 1e-4, gradients clipped at norm 0.1) at its lr for batch 8.
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-4, weight_decay=1e-4),
    clip_grad=dict(max_norm=0.1, norm_type=2))
# Linear warm-up over the first 100 iterations, under its own name: a config's param_scheduler
# list starts with it, then decays (lists are replaced, not merged).
lr_warmup_100i = dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=100)
# mmdet's tools/train.py --auto-scale-lr needs both keys (it sets enable=True); the configs' lr
# is for 1 GPU x batch 8.
auto_scale_lr = dict(enable=False, base_batch_size=8)
