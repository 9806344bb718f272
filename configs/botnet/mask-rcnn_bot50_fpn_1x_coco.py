# Mask R-CNN with a BoT50 backbone: mmdet's R50 config with c5's 3x3 convolutions replaced by
# multi-head self-attention (BoTNet, Srinivas et al. 2021). The ImageNet ResNet-50 checkpoint
# of the base config initialises every kept layer; the attention is new.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['mmdet_detrx'], allow_failed_imports=False)

model = dict(backbone=dict(type='BoTNet'))
