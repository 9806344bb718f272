# Iteration-based training on one CPU (batch 8), shared by the embedded-dataset detectors of
# configs/demo and configs/detr: mmdet's default runtime with iteration-based loops, logs and
# checkpoints. A config adds its optimizer, max_iters, lr schedule and intervals.
_base_ = 'mmdet::_base_/default_runtime.py'

train_cfg = dict(type='IterBasedTrainLoop')
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(checkpoint=dict(type='CheckpointHook', by_epoch=False, max_keep_ckpts=2))
log_processor = dict(by_epoch=False)
# mmdet's tools/train.py --auto-scale-lr needs both keys (it sets enable=True); the configs' lr
# is for 1 GPU x batch 8.
auto_scale_lr = dict(enable=False, base_batch_size=8)
