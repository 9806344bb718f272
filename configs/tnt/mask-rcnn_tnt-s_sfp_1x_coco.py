# Mask R-CNN with a TNT-S backbone (timm's tnt_s_patch16_224) and ViTDet's simple
# feature pyramid (strides 4-32 from the stride-16 map, + a max-pooled stride-64 level for RPN)
# in place of ResNet-50 + FPN. The backbone loads timm's ImageNet state dict, see README.md.
# The ViT-S config with the backbone swapped: timm's TNT-S weights were trained on the same
# [-1, 1] normalisation, TNT-S outputs ViT-S's 384 channels at stride 16, and transformer
# backbones take the same AdamW recipe (ViTDet's: lr 1e-4, weight decay 0.1, none on norms and
# position / class embeddings).
_base_ = '../vit/mask-rcnn_vit-s_sfp_1x_coco.py'

model = dict(
    backbone=dict(type='TNT', init_cfg=dict(checkpoint='checkpoints/tnt_s_patch16_224.pth')))
