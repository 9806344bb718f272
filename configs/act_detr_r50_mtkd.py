# MTKD fine-tune of ACT-DETR-R50 from mmdet's DETR-R50 on COCO, the documented entry point kept
# at this path. The config is configs/mtkd/act-detr-mtkd_r50_8xb2-6e_coco.py (configs/mtkd).
_base_ = './mtkd/act-detr-mtkd_r50_8xb2-6e_coco.py'
