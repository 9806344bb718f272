# ACT-DETR-DC5-R50 on COCO (the paper's setting), the documented entry point kept at this path.
# The config is configs/act/act-detr_r50-dc5_8xb2-150e_coco.py (configs/act/README.md).
_base_ = './act/act-detr_r50-dc5_8xb2-150e_coco.py'
