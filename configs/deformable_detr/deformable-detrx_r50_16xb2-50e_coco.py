# mmdet's Deformable DETR with every deformable attention (encoder self-attention, decoder
# cross-attention) computed by mmdet_detrx's MSDeformAttn. Same parameters as upstream, so
# mmdet's deformable-detr_r50_16xb2-50e_coco checkpoint loads strictly.
_base_ = [
    'mmdet::deformable_detr/deformable-detr_r50_16xb2-50e_coco.py', '../_base_/msdeform_attn.py'
]
custom_imports = dict(imports=['mmdet_detrx'], allow_failed_imports=False)

model = dict(type='DeformableDETRX', **_base_.msdeform_attn_layers)

# Upstream's auto_scale_lr lacks `enable`, without which mmdet's tools/train.py --auto-scale-lr
# refuses the config; base_batch_size stays upstream's.
auto_scale_lr = dict(enable=False)
