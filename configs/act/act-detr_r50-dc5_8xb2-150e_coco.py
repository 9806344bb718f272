# ACT on DETR-DC5-R50, the paper's setting: dilated C5 (output stride 16) as in DETR-DC5.
# configs/act_detr_r50-dc5.py is this config.
_base_ = './act-detr_r50_8xb2-150e_coco.py'

model = dict(backbone=dict(strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2), out_indices=(3, )))
