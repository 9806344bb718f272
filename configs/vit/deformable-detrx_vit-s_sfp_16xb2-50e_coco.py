# Deformable DETR (our MSDeformAttn: configs/deformable_detr) with a plain ViT-S/16 backbone
# (timm's vit_small_patch16_224) and ViTDet's simple feature pyramid: strides 8, 16, 32 plus a
# stride-64 level by a strided conv, the four levels Deformable DETR's ChannelMapper gives R50.
_base_ = [
    '../deformable_detr/deformable-detrx_r50_16xb2-50e_coco.py', '../_base_/models/vit-s_sfp.py'
]

model = dict(
    data_preprocessor=_base_.vit_s_data_preprocessor,
    backbone=dict(_delete_=True, **_base_.vit_s_backbone),
    neck=dict(_delete_=True, **_base_.sfp_detr_neck))
