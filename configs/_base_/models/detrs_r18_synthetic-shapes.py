# Pieces the small DETRs trained from scratch on the embedded dataset share (configs/demo,
# configs/detr and the configs built on them), under distinct names so that this file sits next
# to the dataset and schedule bases:
#   _base_ = [..., '../_base_/models/detrs_r18_synthetic-shapes.py']
#   model = dict(data_preprocessor=_base_.detr_data_preprocessor,
#                backbone=dict(**_base_.resnet18_from_scratch, out_indices=(3, )), ...)

# ImageNet mean / std, RGB; no padding to a multiple (the 160x160 images batch as they are).
detr_data_preprocessor = dict(
    type='DetDataPreprocessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_size_divisor=1)
# From scratch, as no pretrained weights are downloadable here: BN statistics are learnt and no
# stage is frozen. A config adds out_indices (and strides / dilations for a dilated C5).
resnet18_from_scratch = dict(
    type='ResNet',
    depth=18,
    num_stages=4,
    frozen_stages=-1,
    norm_cfg=dict(type='BN', requires_grad=True),
    norm_eval=False,
    style='pytorch',
    init_cfg=None)
# The box terms of every head's Hungarian matching cost (L1 and GIoU, DETR's weights); a config
# puts its classification term first.
hungarian_box_costs = [
    dict(type='BBoxL1Cost', weight=5.0, box_format='xywh'),
    dict(type='IoUCost', iou_mode='giou', weight=2.0)
]
# With a focal-loss classification cost, for the heads trained with a focal classification loss
# (Deformable DETR's and Conditional DETR's).
focal_hungarian_assigner = dict(
    type='HungarianAssigner',
    match_costs=[dict(type='FocalLossCost', weight=2.0), *hungarian_box_costs])
