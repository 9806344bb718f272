# ViT-S/16 (timm's vit_small_patch16_224, ImageNet weights: configs/vit/README.md) and ViTDet's
# simple feature pyramid on its stride-16 map, under distinct names so that this file sits next
# to any detector base; a config swaps them for that detector's ResNet-50 and neck:
#   _base_ = [DETECTOR_CONFIG, '../_base_/models/vit-s_sfp.py']
#   model = dict(data_preprocessor=_base_.vit_s_data_preprocessor,
#                backbone=dict(_delete_=True, **_base_.vit_s_backbone),
#                neck=dict(_delete_=True, **_base_.sfp_detr_neck))

# timm's ViT-S/16 weights were trained on images normalised to [-1, 1]
vit_s_data_preprocessor = dict(mean=[127.5, 127.5, 127.5], std=[127.5, 127.5, 127.5])
vit_s_backbone = dict(
    type='ViT',
    arch='small',
    drop_path_rate=0.1,
    init_cfg=dict(type='Pretrained', checkpoint='checkpoints/vit_small_patch16_224.pth'))

# R-CNNs: strides 4-32 plus a max-pooled stride-64 level for RPN, the five levels of FPN.
sfp_rcnn_neck = dict(
    type='SimpleFeaturePyramid',
    in_channels=384,
    out_channels=256,
    scale_factors=(4.0, 2.0, 1.0, 0.5),
    num_outs=5)
# DETR family: strides 8, 16, 32 plus a stride-64 level by a strided conv, the four levels the
# DETRs' ChannelMapper gives R50.
sfp_detr_neck = dict(sfp_rcnn_neck, scale_factors=(2.0, 1.0, 0.5), num_outs=4, extra_level='conv')
