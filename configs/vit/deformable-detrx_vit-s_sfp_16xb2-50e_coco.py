# Deformable DETR (our MSDeformAttn: configs/deformable_detr) with a plain ViT-S/16 backbone
# (timm's vit_small_patch16_224) and ViTDet's simple feature pyramid: strides 8, 16, 32 plus a
# stride-64 level by a strided conv, the four levels Deformable DETR's ChannelMapper gives R50.
_base_ = '../deformable_detr/deformable-detrx_r50_16xb2-50e_coco.py'

model = dict(
    # timm's ViT-S/16 weights were trained on images normalised to [-1, 1]
    data_preprocessor=dict(mean=[127.5, 127.5, 127.5], std=[127.5, 127.5, 127.5]),
    backbone=dict(
        _delete_=True,
        type='ViT',
        arch='small',
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/vit_small_patch16_224.pth')),
    neck=dict(
        _delete_=True,
        type='SimpleFeaturePyramid',
        in_channels=384,
        out_channels=256,
        scale_factors=(2.0, 1.0, 0.5),
        num_outs=4,
        extra_level='conv'))
