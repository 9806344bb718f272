# `make demo`: a small Deformable DETR with our native MSDeformAttn, trained from scratch on the
# embedded synthetic-shapes dataset on CPU and evaluated by CocoMetric (docs/benchmarks.md has
# the time and mAP measured).
_base_ = [
    '../_base_/datasets/synthetic_shapes.py', '../_base_/schedules/iters_1xb8_synthetic-shapes.py',
    '../_base_/models/detrs_r18_synthetic-shapes.py'
]
custom_imports = dict(imports=['mmdet_detrx'], allow_failed_imports=False)

embed_dims = 128
num_levels = 3
model = dict(
    type='DeformableDETRX',
    num_queries=50,
    num_feature_levels=num_levels,
    with_box_refine=False,
    as_two_stage=False,
    data_preprocessor=_base_.detr_data_preprocessor,
    backbone=dict(**_base_.resnet18_from_scratch, out_indices=(1, 2, 3)),
    neck=dict(
        type='ChannelMapper',
        in_channels=[128, 256, 512],
        kernel_size=1,
        out_channels=embed_dims,
        act_cfg=None,
        norm_cfg=dict(type='GN', num_groups=32),
        num_outs=num_levels),
    encoder=dict(
        num_layers=3,
        layer_cfg=dict(
            self_attn_cfg=dict(
                type='MSDeformAttn', embed_dims=embed_dims, num_levels=num_levels,
                batch_first=True),
            ffn_cfg=dict(embed_dims=embed_dims, feedforward_channels=512, ffn_drop=0.0))),
    decoder=dict(
        num_layers=3,
        return_intermediate=True,
        layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=embed_dims, num_heads=8, dropout=0.0,
                               batch_first=True),
            cross_attn_cfg=dict(
                type='MSDeformAttn', embed_dims=embed_dims, num_levels=num_levels,
                batch_first=True),
            ffn_cfg=dict(embed_dims=embed_dims, feedforward_channels=512, ffn_drop=0.0)),
        post_norm_cfg=None),
    positional_encoding=dict(num_feats=embed_dims // 2, normalize=True, offset=-0.5),
    bbox_head=dict(
        type='DeformableDETRHead',
        num_classes=3,
        embed_dims=embed_dims,
        sync_cls_avg_factor=True,
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25,
                      loss_weight=2.0),
        loss_bbox=dict(type='L1Loss', loss_weight=5.0),
        loss_iou=dict(type='GIoULoss', loss_weight=2.0)),
    train_cfg=dict(assigner=_base_.focal_hungarian_assigner),
    test_cfg=dict(max_per_img=50))

# DETR's optimizer (the schedule base) at twice its lr, offsets and reference points at 0.1x.
optim_wrapper = dict(
    optimizer=dict(lr=4e-4),
    paramwise_cfg=dict(custom_keys={
        'sampling_offsets': dict(lr_mult=0.1),
        'reference_points': dict(lr_mult=0.1)
    }))

max_iters = 1000
train_cfg = dict(max_iters=max_iters, val_interval=500)
param_scheduler = [
    _base_.lr_warmup_100i,
    dict(type='MultiStepLR', by_epoch=False, begin=0, end=max_iters, milestones=[800], gamma=0.1)
]
default_hooks = dict(logger=dict(interval=25), checkpoint=dict(interval=500))
