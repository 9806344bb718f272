"""Distillation losses between a student's and a teacher's recorded outputs.

Each loss takes ``student`` and ``teacher`` tensors of the same shape ``(..., D)``: the last
dimension is one vector (a box ``(cx, cy, w, h)``, a query feature, a row of class logits), every
other dimension indexes vectors that correspond one to one. A per-vector distance is computed
over ``D``, then reduced over the vectors: ``'mean'``, ``'sum'``, or ``'batchmean'`` (summed over
all vectors of a sample, averaged over the first dimension: for boxes (B, Q, 4), the squared
norm of the difference of an image's whole box set, as in ``||B_full - B_act||^2``; for the
every-layer boxes (L, B, Q, 4) that ``bbox_head`` index ``1`` records, the first dimension is the
decoder layer, so the sum over the batch is averaged over layers):

* :class:`L2DistillLoss`: squared Euclidean distance ``||s - t||^2`` (the box KD of MTKD,
  Zheng et al., "End-to-End Object Detection with Adaptive Clustering Transformer",
  BMVC 2021).
* :class:`L1DistillLoss`: ``||s - t||_1``, the distance DETR's own box loss uses.
* :class:`KLDistillLoss`: ``KL(softmax(t / T) || softmax(s / T)) * T^2`` over logits (Hinton et
  al., "Distilling the Knowledge in a Neural Network", 2015); the ``T^2`` keeps gradient scale
  independent of the temperature.

The teacher side is not detached here: a frozen teacher carries no grad anyway, and MTKD
chooses itself whether its full-attention branch receives the KD gradient.

Distillation without matching is one to one, so the shapes must agree exactly; e.g. DETRs with
different ``num_queries`` cannot be distilled query by query and raise a ``ValueError``.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmdet.registry import MODELS

__all__ = ['L2DistillLoss', 'L1DistillLoss', 'KLDistillLoss']


class _DistillLoss(nn.Module):

    def __init__(self, loss_weight: float = 1.0, reduction: str = 'mean'):
        super().__init__()
        if reduction not in ('mean', 'sum', 'batchmean'):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'batchmean', got {reduction!r}")
        if not loss_weight >= 0:
            raise ValueError(f'loss_weight must be >= 0, got {loss_weight}')
        self.loss_weight = float(loss_weight)
        self.reduction = reduction

    def distance(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Per-vector distance, shape ``student.shape[:-1]``."""
        raise NotImplementedError

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        for arg, value in (('student', student), ('teacher', teacher)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f'{arg} must be a Tensor, got {type(value).__name__}')
        if student.shape != teacher.shape:
            raise ValueError(
                f'{type(self).__name__}: student shape {tuple(student.shape)} != teacher shape '
                f'{tuple(teacher.shape)}; one-to-one distillation needs outputs that correspond '
                'element by element (same num_queries, decoder layers and feature size)')
        if student.dim() == 0:
            raise ValueError('student and teacher need at least one dimension (the vector)')
        dist = self.distance(student, teacher.to(student.dtype))
        if self.reduction == 'mean':
            loss = dist.mean()
        elif self.reduction == 'sum' or dist.dim() == 0:
            loss = dist.sum()
        else:  # batchmean
            loss = dist.sum() / dist.shape[0]
        return self.loss_weight * loss

    def extra_repr(self) -> str:
        return f'loss_weight={self.loss_weight}, reduction={self.reduction!r}'


@MODELS.register_module()
class L2DistillLoss(_DistillLoss):
    """Squared Euclidean distance between corresponding vectors."""

    def distance(self, student, teacher):
        return (student - teacher).pow(2).sum(-1)


@MODELS.register_module()
class L1DistillLoss(_DistillLoss):
    """L1 distance between corresponding vectors."""

    def distance(self, student, teacher):
        return (student - teacher).abs().sum(-1)


@MODELS.register_module()
class KLDistillLoss(_DistillLoss):
    """KL divergence from the teacher's to the student's softened class distribution.

    Args:
        temperature (float): softmax temperature ``T`` (> 0) applied to both logits.
    """

    def __init__(self, temperature: float = 1.0, loss_weight: float = 1.0,
                 reduction: str = 'mean'):
        super().__init__(loss_weight, reduction)
        if not temperature > 0:
            raise ValueError(f'temperature must be > 0, got {temperature}')
        self.temperature = float(temperature)

    def distance(self, student, teacher):
        t = self.temperature
        log_p_student = F.log_softmax(student / t, dim=-1)
        log_p_teacher = F.log_softmax(teacher / t, dim=-1)
        kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
        return kl * t * t

    def extra_repr(self) -> str:
        return f'temperature={self.temperature}, {super().extra_repr()}'
