# mmdet's DINO (4 scales) with every deformable attention (encoder self-attention, decoder
# cross-attention) computed by mmdet_detrx's MSDeformAttn. Loads mmdet's
# dino-4scale_r50_8xb2-12e_coco checkpoint strictly.
_base_ = ['mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py', '../_base_/msdeform_attn.py']
custom_imports = dict(imports=['mmdet_detrx'], allow_failed_imports=False)

model = dict(type='DINOX', **_base_.msdeform_attn_layers)

# Upstream's auto_scale_lr lacks `enable`, without which mmdet's tools/train.py --auto-scale-lr
# refuses the config; base_batch_size stays upstream's.
auto_scale_lr = dict(enable=False)
