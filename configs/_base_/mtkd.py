# MTKD (ACT paper, Zheng et al. BMVC 2021) settings shared by configs/mtkd (docs/mtkd.md), under
# distinct names so that this file sits next to any ACT detector base:
#   _base_ = [ACT_DETECTOR_CONFIG, '../_base_/mtkd.py']
#   model = dict(type='MTKDDETR', **_base_.mtkd_model)
#   val_evaluator = [dict(_base_.val_evaluator, prefix='act'),
#                    dict(_base_.val_evaluator, **_base_.mtkd_full_branch_metric)]

# Both branches trained on the ground truth with weight 1, L2 between their box outputs at every
# decoder layer, no KD gradient into the exact branch; test runs both branches.
mtkd_model = dict(
    act_loss_weight=1.0,
    full_loss_weight=1.0,
    loss_kd=dict(type='L2DistillLoss', loss_weight=1.0, reduction='batchmean'),
    detach_full=True,
    test_branch='both')  # pred_instances: ACT, full_pred_instances: exact attention

# The exact branch's predictions scored as full/bbox_mAP* next to the ACT branch's act/bbox_mAP*
# (the dataset's CocoMetric with prefix='act'), in one pass.
mtkd_full_branch_metric = dict(
    type='BranchCocoMetric', pred_key='full_pred_instances', prefix='full')

# Embedded-dataset fine-tunes: the learning rate the pre-training schedules end with (2e-4
# decayed by 0.1), held constant.
mtkd_synthetic_shapes_optim_wrapper = dict(optimizer=dict(lr=2e-5))
mtkd_constant_lr = [dict(type='ConstantLR', factor=1.0, by_epoch=False, begin=0)]
