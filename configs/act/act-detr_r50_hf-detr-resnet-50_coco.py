# ACT on the HF hub's facebook/detr-resnet-50 (DETR-R50, 500 epochs, 42.0 box AP in HF's card),
# no retraining: the converted checkpoint is mmdet's DETR-R50 layout (timm's ResNet-50 names are
# torchvision's = mmdet's; d=256, 6+6 layers, 100 queries, ImageNet normalisation), so this is
# the ACT-DETR-R50 config with the backbone's ImageNet init dropped. Convert with --coco80, which
# keeps the 80 real COCO classes of HF's 91 category-id outputs (mmdet's CocoDataset/CocoMetric
# label space; docs/converters.md):
#   python tools/model_converters/convert.py HF_FOLDER work_dirs/hf-detr-r50 --coco80
#   python tools/test.py configs/act/act-detr_r50_hf-detr-resnet-50_coco.py \
#       work_dirs/hf-detr-r50/hf-detr_detr-resnet-50.pth
# HF_FOLDER: `huggingface-cli download facebook/detr-resnet-50 --local-dir HF_FOLDER` (or the
# hub cache's snapshots/<hash> folder). The exact model is the converter's own config.
_base_ = './act-detr_r50_8xb2-150e_coco.py'

model = dict(backbone=dict(init_cfg=None))  # every weight comes from the converted checkpoint
