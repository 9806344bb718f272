# `make demo`: a small DINO (our DINOX: contrastive denoising, mixed query selection, box
# refinement; every deformable attention our native MSDeformAttn) trained from scratch on the
# embedded synthetic-shapes dataset on CPU. A ResNet-18 at half width (no pretrained weights can
# be downloaded) and, in training only, an FCOS head on the encoder output (DINOXAux, Co-DETR's
# auxiliary-head idea): its dense one-to-many targets train the backbone and encoder far faster
# than one-to-one matching alone. docs/benchmarks.md has the time and mAP measured.
_base_ = [
    '../_base_/datasets/synthetic_shapes.py',
    '../_base_/schedules/iters_1xb8_synthetic-shapes.py',
    '../_base_/models/detrs_r18_synthetic-shapes.py'
]
custom_imports = dict(imports=['mmdet_detrx'], allow_failed_imports=False)

embed_dims = 128
num_levels = 3
base_channels = 32
# The auxiliary losses weigh 8x FCOS's own, so that the dense head, not one-to-one matching,
# drives the backbone and encoder (val mAP at 1000 iterations, one run each: 0.148 at 1x, 0.119
# at 2x, 0.228 at 4x, 0.280 at 8x; docs/benchmarks.md).
aux_loss_weight = 8.0
model = dict(
    type='DINOXAux',
    aux_head=dict(
        type='FCOSHead',
        num_classes=3,
        in_channels=embed_dims,
        feat_channels=embed_dims,
        stacked_convs=1,
        strides=(8, 16, 32),
        regress_ranges=((-1, 32), (32, 64), (64, 1e8)),
        norm_cfg=dict(type='GN', num_groups=32, requires_grad=True),
        center_sampling=True,
        center_sample_radius=1.5,
        norm_on_bbox=True,
        centerness_on_reg=True,
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25,
                      loss_weight=aux_loss_weight),
        loss_bbox=dict(type='GIoULoss', loss_weight=aux_loss_weight),
        loss_centerness=dict(type='CrossEntropyLoss', use_sigmoid=True,
                             loss_weight=aux_loss_weight)),
    num_queries=30,
    with_box_refine=True,
    as_two_stage=True,
    num_feature_levels=num_levels,
    data_preprocessor=_base_.detr_data_preprocessor,
    backbone=dict(**_base_.resnet18_from_scratch, out_indices=(1, 2, 3), base_channels=base_channels),
    neck=dict(
        type='ChannelMapper',
        in_channels=[base_channels * 2, base_channels * 4, base_channels * 8],
        kernel_size=1,
        out_channels=embed_dims,
        act_cfg=None,
        norm_cfg=dict(type='GN', num_groups=32),
        num_outs=num_levels),
    encoder=dict(
        num_layers=3,
        layer_cfg=dict(
            self_attn_cfg=dict(type='MSDeformAttn', embed_dims=embed_dims, num_levels=num_levels,
                               dropout=0.0, batch_first=True),
            ffn_cfg=dict(embed_dims=embed_dims, feedforward_channels=512, ffn_drop=0.0))),
    decoder=dict(
        num_layers=3,
        return_intermediate=True,
        layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=embed_dims, num_heads=8, dropout=0.0, batch_first=True),
            cross_attn_cfg=dict(type='MSDeformAttn', embed_dims=embed_dims, num_levels=num_levels,
                                dropout=0.0, batch_first=True),
            ffn_cfg=dict(embed_dims=embed_dims, feedforward_channels=512, ffn_drop=0.0)),
        post_norm_cfg=None),
    positional_encoding=dict(num_feats=embed_dims // 2, normalize=True, offset=0.0,
                             temperature=20),
    bbox_head=dict(
        type='DINOHead',
        embed_dims=embed_dims,
        num_classes=3,
        sync_cls_avg_factor=True,
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25,
                      loss_weight=1.0),
        loss_bbox=dict(type='L1Loss', loss_weight=5.0),
        loss_iou=dict(type='GIoULoss', loss_weight=2.0)),
    dn_cfg=dict(label_noise_scale=0.5, box_noise_scale=1.0,
                group_cfg=dict(dynamic=True, num_groups=None, num_dn_queries=60)),
    train_cfg=dict(assigner=_base_.focal_hungarian_assigner),
    test_cfg=dict(max_per_img=30))

# 5x DETR's lr (the schedule base's 2e-4); 2e-3 diverged.
optim_wrapper = dict(optimizer=dict(lr=1e-3))

max_iters = 1000
train_cfg = dict(max_iters=max_iters, val_interval=500)
param_scheduler = [
    _base_.lr_warmup_100i,
    dict(type='MultiStepLR', by_epoch=False, begin=0, end=max_iters, milestones=[800], gamma=0.1)
]
default_hooks = dict(logger=dict(interval=25), checkpoint=dict(interval=500))
