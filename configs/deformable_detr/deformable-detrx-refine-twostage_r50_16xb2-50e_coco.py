# mmdet's two-stage Deformable DETR with box refinement, every deformable attention computed
# by mmdet_detrx's MSDeformAttn. Loads mmdet's
# deformable-detr-refine-twostage_r50_16xb2-50e_coco checkpoint strictly. Upstream's config is
# its single-stage one with these two switches, and so is this one.
_base_ = './deformable-detrx_r50_16xb2-50e_coco.py'

model = dict(with_box_refine=True, as_two_stage=True)
