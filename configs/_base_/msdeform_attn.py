# Every deformable attention of mmdet's Deformable DETR family (encoder self-attention, decoder
# cross-attention) computed by mmdet_detrx's MSDeformAttn: same parameters as mmdet's
# MultiScaleDeformableAttention, so upstream checkpoints load strictly. A distinct name, so it
# sits next to any such detector base; a config merges it into that detector:
#   _base_ = [DETECTOR_CONFIG, '../_base_/msdeform_attn.py']
#   model = dict(type='DeformableDETRX', **_base_.msdeform_attn_layers)
msdeform_attn_layers = dict(
    encoder=dict(layer_cfg=dict(self_attn_cfg=dict(type='MSDeformAttn'))),
    decoder=dict(layer_cfg=dict(cross_attn_cfg=dict(type='MSDeformAttn'))))
