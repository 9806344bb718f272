# MTKD (ACT paper, Zheng et al. BMVC 2021): fine-tune ACT-DETR-R50 from a pretrained exact
# DETR-R50. One backbone pass feeds the transformer twice with the same weights, once with ACT
# (clustered encoder attention) and once with exact attention; loss = GT loss of both branches
# + L2 between their box outputs at every decoder layer (MTKDDETR's docstring has the details).
# Validation scores both branches of the same model: metrics `act/bbox_mAP*`, `full/bbox_mAP*`.
# configs/act_detr_r50_mtkd.py is this config.
_base_ = ['../act/act-detr_r50_8xb2-150e_coco.py', '../_base_/mtkd.py']

# mmdet's DETR-R50 150e (0.401 box AP); our parameter names are DETR's, so it loads strictly.
pretrained_detr = 'https://download.openmmlab.com/mmdetection/v3.0/detr/detr_r50_8xb2-150e_coco/detr_r50_8xb2-150e_coco_20221023_153551-436d03e8.pth'  # noqa: E501
load_from = pretrained_detr

model = dict(
    type='MTKDDETR',
    **_base_.mtkd_model,
    backbone=dict(init_cfg=None))  # every weight comes from load_from

# Short fine-tune at the learning rate DETR ends its 150-epoch schedule with.
max_epochs = 6
train_cfg = dict(max_epochs=max_epochs, val_interval=1)
optim_wrapper = dict(optimizer=dict(lr=1e-5))
param_scheduler = [
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[4], gamma=0.1)
]

val_evaluator = [dict(_base_.val_evaluator, prefix='act'),
                 dict(_base_.val_evaluator, **_base_.mtkd_full_branch_metric)]
test_evaluator = val_evaluator
default_hooks = dict(checkpoint=dict(save_best='act/bbox_mAP', rule='greater'))
