# DINO (4 scales, our MSDeformAttn: configs/dino) with a TNT-S backbone (timm's
# tnt_s_patch16_224) and ViTDet's simple feature pyramid: strides 8, 16, 32 from the stride-16
# map plus a stride-64 level by a strided conv, the four levels DINO's ChannelMapper gives R50.
# The ViT-S config with the backbone swapped: timm's TNT-S weights were trained on the same
# [-1, 1] normalisation, and TNT-S outputs ViT-S's 384 channels at stride 16.
_base_ = '../vit/dinox-4scale_vit-s_sfp_8xb2-12e_coco.py'

model = dict(
    backbone=dict(type='TNT', init_cfg=dict(checkpoint='checkpoints/tnt_s_patch16_224.pth')))
