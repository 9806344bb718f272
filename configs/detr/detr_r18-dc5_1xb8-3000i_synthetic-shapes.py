# A small plain DETR (exact encoder attention) trained from scratch on the embedded dataset: the
# "pretrained DETR" that ACT replaces without retraining and that MTKD fine-tunes from
# (docs/act.md, docs/mtkd.md). Dilated C5 (stride 16) as in the paper's DETR-DC5.
_base_ = [
    '../_base_/datasets/synthetic_shapes.py', '../_base_/schedules/iters_1xb8_synthetic-shapes.py',
    '../_base_/models/detrs_r18_synthetic-shapes.py'
]
custom_imports = dict(imports=['mmdet_detrx'], allow_failed_imports=False)

embed_dims = 128
model = dict(
    type='DETRX',
    num_queries=30,
    data_preprocessor=_base_.detr_data_preprocessor,
    backbone=dict(
        **_base_.resnet18_from_scratch,
        strides=(1, 2, 2, 1),
        dilations=(1, 1, 1, 2),
        out_indices=(3, )),
    neck=dict(
        type='ChannelMapper',
        in_channels=[512],
        kernel_size=1,
        out_channels=embed_dims,
        act_cfg=None,
        norm_cfg=None,
        num_outs=1),
    encoder=dict(
        num_layers=3,
        layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=embed_dims, num_heads=8, dropout=0.0,
                               batch_first=True),
            ffn_cfg=dict(embed_dims=embed_dims, feedforward_channels=512, num_fcs=2,
                         ffn_drop=0.0, act_cfg=dict(type='ReLU', inplace=True)))),
    decoder=dict(
        num_layers=3,
        layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=embed_dims, num_heads=8, dropout=0.0,
                               batch_first=True),
            cross_attn_cfg=dict(embed_dims=embed_dims, num_heads=8, dropout=0.0,
                                batch_first=True),
            ffn_cfg=dict(embed_dims=embed_dims, feedforward_channels=512, num_fcs=2,
                         ffn_drop=0.0, act_cfg=dict(type='ReLU', inplace=True))),
        return_intermediate=True),
    positional_encoding=dict(num_feats=embed_dims // 2, normalize=True),
    bbox_head=dict(
        type='DETRHead',
        num_classes=3,
        embed_dims=embed_dims,
        loss_cls=dict(type='CrossEntropyLoss', bg_cls_weight=0.1, use_sigmoid=False,
                      loss_weight=1.0, class_weight=1.0),
        loss_bbox=dict(type='L1Loss', loss_weight=5.0),
        loss_iou=dict(type='GIoULoss', loss_weight=2.0)),
    train_cfg=dict(
        assigner=dict(
            type='HungarianAssigner',
            match_costs=[dict(type='ClassificationCost', weight=1.), *_base_.hungarian_box_costs])),
    test_cfg=dict(max_per_img=30))

# The schedule base's optimizer (DETR's) as it is; logs every 50 iterations (mmdet's default).
max_iters = 3000
train_cfg = dict(max_iters=max_iters, val_interval=1000)
param_scheduler = [
    _base_.lr_warmup_100i,
    dict(type='MultiStepLR', by_epoch=False, begin=0, end=max_iters, milestones=[2500], gamma=0.1)
]
default_hooks = dict(checkpoint=dict(interval=1000))
