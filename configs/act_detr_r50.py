# ACT-DETR-R50 on COCO, the documented entry point kept at this path:
#   python tools/test.py configs/act_detr_r50.py DETR_CKPT
# The config is configs/act/act-detr_r50_8xb2-150e_coco.py (configs/act/README.md).
_base_ = './act/act-detr_r50_8xb2-150e_coco.py'
