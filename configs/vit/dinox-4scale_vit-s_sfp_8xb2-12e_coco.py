# DINO (4 scales, our MSDeformAttn: configs/dino) with a plain ViT-S/16 backbone (timm's
# vit_small_patch16_224) and ViTDet's simple feature pyramid: strides 8, 16, 32 from the stride-16
# map plus a stride-64 level by a strided conv, the four levels DINO's ChannelMapper gives R50.
_base_ = ['../dino/dinox-4scale_r50_8xb2-12e_coco.py', '../_base_/models/vit-s_sfp.py']

model = dict(
    data_preprocessor=_base_.vit_s_data_preprocessor,
    backbone=dict(_delete_=True, **_base_.vit_s_backbone),
    neck=dict(_delete_=True, **_base_.sfp_detr_neck))
