"""Knowledge distillation from an external frozen teacher, as an mmengine hook.

The teacher is any mmdet detector given by its config and checkpoint (e.g. mmdet's exact
DETR-R50 teaching an ACT-DETR-R50 in ``configs/mtkd/act-detr_r50_kd-detr-r50_8xb2-12e_coco.py``).
Each iteration the hook runs the teacher on the batch (no grad, eval
mode, through the student's own code path ``forward(mode='loss')``, its losses discarded),
recorders capture named outputs of teacher and student, and the weighted KD terms are added to
the student's loss dict: a forward hook on the student appends them to what its
``forward(mode='loss')`` returns, so any student model works unchanged, mmengine sums the terms
into the loss (their names contain ``loss``) and logs each of them.

Config::

    custom_hooks = [dict(
        type='DistillationHook',
        teacher_config='mmdet::detr/detr_r50_8xb2-150e_coco.py',  # or the teacher's model dict
        teacher_checkpoint='work_dirs/detr_r50/epoch_150.pth',  # path or URL, loaded strictly
        distill=dict(
            loss_kd_boxes=dict(student=dict(module='bbox_head', index=1),
                               teacher=dict(module='bbox_head', index=1),
                               loss=dict(type='L2DistillLoss', loss_weight=1.0)),
            loss_kd_logits=dict(student=dict(module='bbox_head', index=0),
                                teacher=dict(module='bbox_head', index=0),
                                loss=dict(type='KLDistillLoss', temperature=2.0))))]

Recorder specs are those of :class:`~mmdet_detrx.distill.RecorderManager`. When a module runs
several times in one student forward (e.g. ``MTKDDETR``'s ACT then full branch), the first
output is distilled (the ACT branch's).

The teacher is kept out of the runner's model: it is neither optimised nor saved in
checkpoints; a resumed run reloads it from ``teacher_checkpoint``.
"""
import copy
import os.path as osp
from typing import Dict, Optional, Union

import torch
import torch.nn as nn
from mmengine.config import Config, ConfigDict
from mmengine.hooks import Hook
from mmengine.hub import get_config
from mmengine.model import is_model_wrapper
from mmengine.runner import load_checkpoint
from mmdet.registry import HOOKS, MODELS

from mmdet_detrx.distill.recorders import RecorderManager

__all__ = ['DistillationHook']

_REMOTE_PREFIXES = ('http://', 'https://', 's3://', 'torchvision://', 'open-mmlab://',
                    'openmmlab://', 'mmcls://', 'pavi://', 'modelzoo://')


@HOOKS.register_module()
class DistillationHook(Hook):
    """Distil the runner's model from a frozen teacher built from an mmdet config + checkpoint.

    Args:
        teacher_config (str | dict): teacher config file (``'mmdet::...'`` for one packaged
            with mmdet), a config holding ``model``, or the teacher's model dict itself.
        teacher_checkpoint (str): teacher weights (path or URL).
        distill (dict): ``{loss_name: dict(student=spec, teacher=spec, loss=loss_cfg)}``.
            ``loss_name`` must contain ``'loss'`` so that mmengine adds it to the total.
        strict (bool): load the teacher checkpoint strictly. Default True.
    """

    priority = 'NORMAL'

    def __init__(self,
                 teacher_config: Union[str, dict],
                 teacher_checkpoint: str,
                 distill: Dict[str, dict],
                 strict: bool = True):
        if not isinstance(teacher_config, (str, dict)):
            raise TypeError('teacher_config must be a config path or dict, got '
                            f'{type(teacher_config).__name__}')
        if not isinstance(teacher_checkpoint, str):
            raise TypeError('teacher_checkpoint must be a str, got '
                            f'{type(teacher_checkpoint).__name__}')
        if not isinstance(distill, dict) or not distill:
            raise TypeError(f'distill must be a non-empty dict of loss_name -> '
                            f'dict(student, teacher, loss), got {distill!r}')
        for name, term in distill.items():
            if 'loss' not in name:
                raise ValueError(f"distill key {name!r} must contain 'loss' (mmengine only "
                                 'adds such keys to the total loss)')
            missing = {'student', 'teacher', 'loss'} - set(term)
            if missing:
                raise ValueError(f'distill[{name!r}] lacks {sorted(missing)}')
        self.teacher_config = teacher_config
        self.teacher_checkpoint = teacher_checkpoint
        self.distill = copy.deepcopy(dict(distill))
        self.strict = strict
        self.losses = nn.ModuleDict({name: MODELS.build(term['loss'])
                                     for name, term in self.distill.items()})
        self.teacher: Optional[nn.Module] = None
        self._teacher_recorders: Optional[RecorderManager] = None
        self._student_recorders: Optional[RecorderManager] = None
        self._student_handle = None

    # -- setup ----------------------------------------------------------------------------
    def before_train(self, runner) -> None:
        self._check_checkpoint()
        student = runner.model.module if is_model_wrapper(runner.model) else runner.model
        self.teacher = self.build_teacher().to(_device_of(student))
        self._teacher_recorders = RecorderManager(
            self.teacher, {name: term['teacher'] for name, term in self.distill.items()})
        self._student_recorders = RecorderManager(
            student, {name: term['student'] for name, term in self.distill.items()})
        self._student_recorders.enabled = False
        self._student_handle = student.register_forward_hook(self._add_distill_losses,
                                                             with_kwargs=True)
        self.losses.to(_device_of(student))
        runner.logger.info(f'DistillationHook: frozen teacher {type(self.teacher).__name__} '
                           f'from {self.teacher_checkpoint}, KD terms {list(self.distill)}')

    def _check_checkpoint(self) -> None:
        path = self.teacher_checkpoint
        if not path.startswith(_REMOTE_PREFIXES) and not osp.isfile(path):
            raise FileNotFoundError(f'teacher_checkpoint {path!r} does not exist')

    def build_teacher(self) -> nn.Module:
        """Build the teacher, load its checkpoint and freeze it (no grads, eval mode)."""
        self._check_checkpoint()
        cfg = self.teacher_config
        if isinstance(cfg, str):
            # 'mmdet::detr/detr_r50_8xb2-150e_coco.py' names a config packaged with mmdet.
            cfg = get_config(cfg) if '::' in cfg else Config.fromfile(cfg)
        if 'model' in cfg:
            cfg = cfg['model']
        teacher = MODELS.build(ConfigDict(copy.deepcopy(dict(cfg))))
        # No init_weights(): every weight comes from the checkpoint (and a pretrained-backbone
        # init_cfg would try to download).
        load_checkpoint(teacher, self.teacher_checkpoint, map_location='cpu', strict=self.strict)
        teacher.requires_grad_(False)
        teacher.eval()
        return teacher

    # -- each iteration ------------------------------------------------------------------
    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        self.teacher.eval()  # whoever called train() on it, BN statistics stay frozen
        self._teacher_recorders.clear()
        self._student_recorders.clear()
        with torch.no_grad():
            data = self.teacher.data_preprocessor(data_batch, False)
            # The student's code path, losses discarded: mmdet's mode='tensor' calls the heads'
            # .forward() directly, which forward hooks (the recorders) never see.
            self.teacher(**data, mode='loss')
        self._student_recorders.enabled = True

    def _add_distill_losses(self, module: nn.Module, args, kwargs, output):
        if kwargs.get('mode') != 'loss' or not self._student_recorders.enabled:
            return None
        output = dict(output)
        for name in self.distill:
            student_out = self._first(self._student_recorders[name], 'student', name)
            teacher_out = self._first(self._teacher_recorders[name], 'teacher', name)
            output[name] = self.losses[name](student_out, teacher_out)
        return output

    @staticmethod
    def _first(recorder, side: str, name: str):
        if not recorder.outputs:
            raise RuntimeError(f'distill[{name!r}]: {side} module {recorder.name!r} did not run '
                               'in its forward pass')
        return recorder.outputs[0]

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        self._student_recorders.enabled = False
        self._teacher_recorders.clear()
        self._student_recorders.clear()

    def after_train(self, runner) -> None:
        if self._student_handle is not None:
            self._student_handle.remove()
            self._student_handle = None
        for recorders in (self._student_recorders, self._teacher_recorders):
            if recorders is not None:
                recorders.remove()
                recorders.clear()


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device('cpu')
