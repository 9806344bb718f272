# Deformable DETR from mmdet_detrx's components: a BoT50 backbone (c5 self-attention) feeding
# MSDeformAttn encoder/decoder layers (configs/deformable_detr). ResNet-50 ImageNet weights
# initialise every kept backbone layer.
_base_ = '../deformable_detr/deformable-detrx_r50_16xb2-50e_coco.py'

model = dict(backbone=dict(type='BoTNet'))
