# Knowledge distillation from an *external* frozen teacher with DistillationHook (docs/mtkd.md):
# mmdet's exact DETR-R50 teaches an ACT-DETR-R50 initialised from the same checkpoint. Unlike
# MTKDDETR (one model, two branches), the teacher is a separate network: any mmdet config +
# checkpoint works, as long as the distilled outputs correspond one to one (same num_queries).
_base_ = '../act/act-detr_r50_8xb2-150e_coco.py'

teacher_checkpoint = 'https://download.openmmlab.com/mmdetection/v3.0/detr/detr_r50_8xb2-150e_coco/detr_r50_8xb2-150e_coco_20221023_153551-436d03e8.pth'  # noqa: E501
load_from = teacher_checkpoint
model = dict(backbone=dict(init_cfg=None))  # every weight comes from load_from

custom_hooks = [
    dict(
        type='DistillationHook',
        teacher_config='mmdet::detr/detr_r50_8xb2-150e_coco.py',
        teacher_checkpoint=teacher_checkpoint,
        distill=dict(
            # Boxes of every decoder layer, (L, B, Q, 4): MTKD's box KD, teacher external.
            loss_kd_boxes=dict(
                student=dict(module='bbox_head', index=1),
                teacher=dict(module='bbox_head', index=1),
                loss=dict(type='L2DistillLoss', loss_weight=1.0, reduction='batchmean')),
            # Encoder memory, (B, H*W, 256): where ACT's approximation enters.
            loss_kd_memory=dict(
                student='encoder', teacher='encoder',
                loss=dict(type='L2DistillLoss', loss_weight=0.01))))
]

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs, val_interval=1)
optim_wrapper = dict(optimizer=dict(lr=1e-5))
param_scheduler = [
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8], gamma=0.1)
]
