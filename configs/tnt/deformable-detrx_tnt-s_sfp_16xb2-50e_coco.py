# Deformable DETR (our MSDeformAttn: configs/deformable_detr) with a TNT-S backbone
# (timm's tnt_s_patch16_224) and ViTDet's simple feature pyramid: strides 8, 16, 32 plus a
# stride-64 level by a strided conv, the four levels Deformable DETR's ChannelMapper gives R50.
# The ViT-S config with the backbone swapped: timm's TNT-S weights were trained on the same
# [-1, 1] normalisation, and TNT-S outputs ViT-S's 384 channels at stride 16.
_base_ = '../vit/deformable-detrx_vit-s_sfp_16xb2-50e_coco.py'

model = dict(
    backbone=dict(type='TNT', init_cfg=dict(checkpoint='checkpoints/tnt_s_patch16_224.pth')))
