# Mask R-CNN with a plain ViT-S/16 backbone (timm's vit_small_patch16_224) and ViTDet's simple
# feature pyramid (strides 4-32 from the stride-16 map, + a max-pooled stride-64 level for RPN)
# in place of ResNet-50 + FPN. The backbone loads timm's ImageNet state dict, see README.md.
_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', '../_base_/models/vit-s_sfp.py']

custom_imports = dict(imports=['mmdet_detrx'], allow_failed_imports=False)

model = dict(
    data_preprocessor=_base_.vit_s_data_preprocessor,
    backbone=dict(_delete_=True, **_base_.vit_s_backbone),
    neck=dict(_delete_=True, **_base_.sfp_rcnn_neck))

# Plain ViTs are trained with AdamW (ViTDet: lr 1e-4, weight decay 0.1), none on norms and
# position / class embeddings.
optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1),
    paramwise_cfg=dict(
        norm_decay_mult=0.,
        custom_keys={'pos_embed': dict(decay_mult=0.), 'cls_token': dict(decay_mult=0.)}),
    clip_grad=dict(max_norm=1.0, norm_type=2))
