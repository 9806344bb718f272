"""DistillationHook: an external frozen teacher distils a student inside mmengine's Runner.

Teacher and student are mmdet's DETR shrunk to a few thousand parameters; the data is a fixed
list of two random batches, so a 2-iteration run takes seconds and is deterministic.
"""
import copy
import os.path as osp

import pytest
import torch
from _helpers.detectors import tiny_detr_cfg as _tiny_detr_cfg
from mmdet.registry import MODELS
from mmdet.testing import demo_mm_inputs
from mmengine.dataset import pseudo_collate
from mmengine.hooks import Hook
from mmengine.runner import Runner
from torch.utils.data import DataLoader

from mmdet_detrx.engine.hooks import DistillationHook

BOX_KD = dict(loss_kd_boxes=dict(student=dict(module='bbox_head', index=1),
                                 teacher=dict(module='bbox_head', index=1),
                                 loss=dict(type='L2DistillLoss', loss_weight=1.0)))


def tiny_detr_cfg(num_queries=10):
    cfg = _tiny_detr_cfg(num_layers=1, num_queries=num_queries)
    # BN layers that *would* update their statistics if the teacher were put in train mode.
    cfg.backbone.update(frozen_stages=-1, norm_eval=False,
                        norm_cfg=dict(type='BN', requires_grad=True))
    return cfg.to_dict()


def save_model(cfg, path, seed):
    torch.manual_seed(seed)
    model = MODELS.build(copy.deepcopy(cfg))  # DETRHead edits its loss_cls cfg in place
    model.init_weights()
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, path)
    return model


def loader():
    samples = []
    for seed in range(2):
        torch.manual_seed(seed)
        data = demo_mm_inputs(batch_size=2, image_shapes=[(3, 96, 96), (3, 64, 96)],
                              num_items=[2, 3], num_classes=3)
        samples += [dict(inputs=i, data_samples=s)
                    for i, s in zip(data['inputs'], data['data_samples'])]
    return DataLoader(samples, batch_size=2, shuffle=False, collate_fn=pseudo_collate)


def make_runner(work_dir, student_cfg, hook_cfg, max_iters, **kwargs):
    return Runner(
        model=copy.deepcopy(student_cfg),
        work_dir=str(work_dir),
        train_dataloader=loader(),
        train_cfg=dict(type='IterBasedTrainLoop', max_iters=max_iters),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01, momentum=0.9)),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False),
                           logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=[hook_cfg],
        default_scope='mmdet',
        randomness=dict(seed=0),
        experiment_name=osp.basename(str(work_dir)),
        **kwargs)


@pytest.fixture
def setup(tmp_path):
    student_cfg = tiny_detr_cfg()
    teacher_path = str(tmp_path / 'teacher.pth')
    save_model(student_cfg, teacher_path, seed=1)
    hook_cfg = dict(type='DistillationHook', teacher_config=tiny_detr_cfg(),
                    teacher_checkpoint=teacher_path, distill=BOX_KD)
    return tmp_path, student_cfg, hook_cfg


def _hook(runner):
    return next(h for h in runner.hooks if isinstance(h, DistillationHook))


class TeacherTrainer(Hook):
    """Misbehaves: puts the teacher in train mode after every iteration."""

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        _hook(runner).teacher.train()


def test_teacher_stays_frozen_and_kd_is_logged(setup):
    tmp_path, student_cfg, hook_cfg = setup
    runner = make_runner(tmp_path / 'run', student_cfg, hook_cfg, max_iters=2)
    runner.register_hook(TeacherTrainer(), priority='LOWEST')
    reference = torch.load(hook_cfg['teacher_checkpoint'])['state_dict']
    runner.train()

    teacher = _hook(runner).teacher
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    state = teacher.state_dict()
    for name, value in reference.items():  # weights *and* BN running statistics
        assert torch.equal(state[name], value), name
    # The KD term is part of the loss that was logged.
    kd = runner.message_hub.get_scalar('train/loss_kd_boxes')
    assert len(kd.data[0]) == 2 and min(kd.data[0]) > 0
    # Teacher is not part of the student's checkpoint.
    ckpt = torch.load(osp.join(runner.work_dir, 'iter_2.pth'), weights_only=False)
    assert not any('teacher' in k for k in ckpt['state_dict'])
    assert set(ckpt['state_dict']) == set(reference)


def test_kd_is_zero_with_the_student_as_its_own_teacher(setup, tmp_path):
    _, student_cfg, hook_cfg = setup
    # Student starts from the teacher's weights and, with BN frozen (norm_eval), computes the
    # same function as the teacher: the first KD term is 0 (up to torch's eval-mode attention
    # fast path, which rounds differently).
    student_cfg['backbone']['norm_eval'] = True
    runner = make_runner(tmp_path / 'self', student_cfg, hook_cfg, max_iters=1,
                         load_from=hook_cfg['teacher_checkpoint'])
    runner.train()
    assert runner.message_hub.get_scalar('train/loss_kd_boxes').current() < 1e-10


def test_resume_equals_uninterrupted_run(setup):
    tmp_path, student_cfg, hook_cfg = setup
    full = make_runner(tmp_path / 'full', student_cfg, hook_cfg, max_iters=2)
    full.train()
    first = make_runner(tmp_path / 'split', student_cfg, hook_cfg, max_iters=1)
    first.train()  # saves iter_1.pth (last iteration), SGD momentum included
    resumed = make_runner(tmp_path / 'split', student_cfg, hook_cfg, max_iters=2, resume=True)
    resumed.train()
    assert resumed.iter == 2
    assert _hook(resumed).teacher is not None  # rebuilt from teacher_checkpoint on resume
    expected, got = full.model.state_dict(), resumed.model.state_dict()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


def test_missing_teacher_checkpoint_fails_before_first_iteration(setup):
    tmp_path, student_cfg, hook_cfg = setup
    missing = str(tmp_path / 'nowhere' / 'teacher.pth')
    runner = make_runner(tmp_path / 'missing', student_cfg,
                         dict(hook_cfg, teacher_checkpoint=missing), max_iters=1)
    with pytest.raises(FileNotFoundError, match='nowhere/teacher.pth'):
        runner.train()
    assert runner.iter == 0


def test_different_num_queries_is_a_clear_error(setup):
    tmp_path, student_cfg, hook_cfg = setup
    teacher_cfg = tiny_detr_cfg(num_queries=20)
    path = str(tmp_path / 'teacher20.pth')
    save_model(teacher_cfg, path, seed=2)
    runner = make_runner(tmp_path / 'nq', student_cfg,
                         dict(hook_cfg, teacher_config=teacher_cfg, teacher_checkpoint=path),
                         max_iters=1)
    with pytest.raises(ValueError, match='num_queries'):
        runner.train()


def test_unknown_module_names_close_matches(setup):
    tmp_path, student_cfg, hook_cfg = setup
    distill = dict(loss_kd=dict(student='decoder.layer.0', teacher='decoder.layers.0',
                                loss=dict(type='L2DistillLoss')))
    runner = make_runner(tmp_path / 'typo', student_cfg, dict(hook_cfg, distill=distill),
                         max_iters=1)
    with pytest.raises(ValueError, match="close names.*'decoder.layers.0'"):
        runner.train()
    assert runner.iter == 0


def test_bad_arguments(setup):
    _, _, hook_cfg = setup
    with pytest.raises(ValueError, match="must contain 'loss'"):
        DistillationHook(hook_cfg['teacher_config'], hook_cfg['teacher_checkpoint'],
                         distill={'kd_boxes': BOX_KD['loss_kd_boxes']})
    with pytest.raises(ValueError, match='lacks'):
        DistillationHook(hook_cfg['teacher_config'], hook_cfg['teacher_checkpoint'],
                         distill={'loss_kd': dict(student='encoder')})
