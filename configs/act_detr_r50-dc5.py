# ACT on DETR-DC5-R50, the paper's setting: dilated C5 (output stride 16) as in DETR-DC5.
_base_ = './act_detr_r50.py'

model = dict(backbone=dict(strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2), out_indices=(3, )))
