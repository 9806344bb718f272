# DINO (4 scales, our MSDeformAttn: configs/dino) with a TNT-S backbone (timm's
# tnt_s_patch16_224) and ViTDet's simple feature pyramid: strides 8, 16, 32 from the stride-16
# map plus a stride-64 level by a strided conv, the four levels DINO's ChannelMapper gives R50.
_base_ = '../dino/dinox-4scale_r50_8xb2-12e_coco.py'

model = dict(
    # timm's TNT-S weights were trained on images normalised to [-1, 1]
    data_preprocessor=dict(mean=[127.5, 127.5, 127.5], std=[127.5, 127.5, 127.5]),
    backbone=dict(
        _delete_=True,
        type='TNT',
        arch='small',
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/tnt_s_patch16_224.pth')),
    neck=dict(
        _delete_=True,
        type='SimpleFeaturePyramid',
        in_channels=384,
        out_channels=256,
        scale_factors=(2.0, 1.0, 0.5),
        num_outs=4,
        extra_level='conv'))
