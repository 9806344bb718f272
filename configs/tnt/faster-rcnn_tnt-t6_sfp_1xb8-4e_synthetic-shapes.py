# Faster R-CNN with a small TNT (192-d patches, 16 visual words of 12-d each, 6 blocks) + simple
# feature pyramid, trained from scratch on the embedded synthetic-shapes dataset (no download,
# CPU: see README.md for the run).
_base_ = [
    'mmdet::_base_/models/faster-rcnn_r50_fpn.py',
    '../_base_/datasets/synthetic_shapes.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]

channels = 128
model = dict(
    backbone=dict(
        _delete_=True,
        type='TNT',
        arch=dict(embed_dims=192, inner_dims=12, num_layers=6, num_heads=3, inner_num_heads=2,
                  mlp_ratio=4.),
        pretrain_img_size=160,  # the dataset's image size: the 10x10 grid needs no resizing
        init_cfg=None),  # from scratch: no pretrained weights offline
    neck=dict(
        _delete_=True,
        type='SimpleFeaturePyramid',
        in_channels=192,
        out_channels=channels,
        # CPU time: no stride-4 level (the smallest shapes, 8 px, still cover a stride-8 cell);
        # strides 8, 16, 32 + a max-pooled 64
        scale_factors=(2.0, 1.0, 0.5),
        num_outs=4),
    rpn_head=dict(
        in_channels=channels,
        feat_channels=channels,
        anchor_generator=dict(scales=[4], strides=[8, 16, 32, 64])),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=channels, featmap_strides=[8, 16, 32, 64]),
        bbox_head=dict(in_channels=channels, fc_out_channels=256, num_classes=3)),
    # 128 sampled RoIs per image instead of 512: at most 6 objects per image here, and CPU time
    train_cfg=dict(rcnn=dict(sampler=dict(num=128))))

max_epochs = 4
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[3], gamma=0.1)
]
optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='AdamW', lr=2e-4, weight_decay=0.05),
    paramwise_cfg=dict(
        norm_decay_mult=0.,
        custom_keys={'pos_embed': dict(decay_mult=0.), 'cls_token': dict(decay_mult=0.)}),
    clip_grad=dict(max_norm=10, norm_type=2))
auto_scale_lr = dict(enable=False, base_batch_size=8)
default_hooks = dict(logger=dict(type='LoggerHook', interval=25))
