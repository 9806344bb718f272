"""MTKD: Multi-Task Knowledge Distillation of an ACT encoder from exact attention.

Zheng et al., "End-to-End Object Detection with Adaptive Clustering Transformer", BMVC 2021.
The backbone (and neck) runs once; its features go through the transformer twice, with the same
weights:

* the **act** branch, where the encoder's ``AdaptiveClusteringAttention`` approximates attention
  by clustering the queries;
* the **full** branch, the same modules switched to exact attention (``act_exact_mode``), i.e.
  the original DETR.

::

    loss = act_loss_weight  * L(GT, Y_act)
         + full_loss_weight * L(GT, Y_full)
         + sum over decoder layers l of loss_kd(B_act[l], B_full[l])

``B`` are the sigmoid box outputs ``(cx, cy, w, h)`` of every decoder layer, (L, B, Q, 4) per
branch. Both branches share the object queries, so query ``q`` of one corresponds to query ``q``
of the other: no teacher-student matching. Only boxes are distilled: the regression branch is
the one sensitive to ACT's approximation (the paper's choice).

Defaults, and why:

* ``act_loss_weight = full_loss_weight = 1``: the paper's unweighted sum. The full branch keeps
  its GT loss so the shared weights stay a good exact-attention DETR (the teacher) while they
  adapt to ACT.
* ``loss_kd = L2DistillLoss(loss_weight=1, reduction='batchmean')``: the paper's
  ``||B_full - B_act||^2``, the squared L2 distance between an image's two box sets (summed over
  queries and coordinates, averaged over images), one term per decoder layer (like mmdet's
  ``d{i}.loss_bbox``). Averaging over queries instead would divide it by ``num_queries`` and make
  it negligible next to DETR's box losses (normalised by the few matched boxes).
* ``detach_full = True``: the KD term moves the ACT branch towards the full one, never the
  reverse; otherwise the KD gradient through the full branch would pull the teacher's boxes
  towards the approximate ones. The shared weights still receive the KD gradient (through the
  ACT branch) and both GT gradients.
* ``test_branch = 'act'``: the deployed model is the ACT one; ``'full'`` evaluates exact
  attention with the same weights and ``'both'`` returns both (ACT in ``pred_instances``, full
  in ``full_pred_instances``) for ``mmdet_detrx.evaluation.BranchCocoMetric``.

Parameter names are DETR's, so mmdet's DETR checkpoints load strictly.
"""
import contextlib
from typing import Dict, List, Tuple

import torch
from mmdet.registry import MODELS
from mmdet.structures import SampleList
from torch import Tensor

from mmdet_detrx.distill.recorders import ModuleOutputRecorder
from mmdet_detrx.models.layers.adaptive_clustering_attention import (AdaptiveClusteringAttention,
                                                                     act_exact_mode)
from .detrx import DETRX, ConditionalDETRX, float32_instances

__all__ = ['MTKDMixin', 'MTKDDETR', 'MTKDConditionalDETR']

_TEST_BRANCHES = ('act', 'full', 'both')


class MTKDMixin:
    """MTKD training and branch selection for a DETR-family detector with ACT attention.

    Put it first in the bases of an mmdet ``DetectionTransformer`` subclass whose attentions
    come from the registry (e.g. ``class MTKDConditionalDETR(MTKDMixin, RegistryAttentionMixin,
    ConditionalDETR)``): it relies only on ``extract_feat``, ``forward_transformer`` and a
    ``bbox_head`` whose forward returns ``(cls_scores, bbox_preds)`` for every decoder layer.

    Args:
        act_loss_weight (float): weight of the ACT branch's GT losses.
        full_loss_weight (float): weight of the full-attention branch's GT losses.
        loss_kd (dict): config of the box distillation loss (a ``*DistillLoss``).
        detach_full (bool): stop the KD gradient through the full branch.
        test_branch (str): ``'act'``, ``'full'`` or ``'both'``, the branch(es) ``predict``
            runs.
        *args, **kwargs: those of the detector it is mixed into.
    """

    def __init__(self,
                 *args,
                 act_loss_weight: float = 1.0,
                 full_loss_weight: float = 1.0,
                 loss_kd: dict = dict(
                     type='L2DistillLoss', loss_weight=1.0, reduction='batchmean'),
                 detach_full: bool = True,
                 test_branch: str = 'act',
                 **kwargs):
        super().__init__(*args, **kwargs)
        for name, value in (('act_loss_weight', act_loss_weight),
                            ('full_loss_weight', full_loss_weight)):
            if not value >= 0:
                raise ValueError(f'{name} must be >= 0, got {value}')
        if not any(isinstance(m, AdaptiveClusteringAttention) for m in self.modules()):
            raise ValueError(
                f'{type(self).__name__} needs AdaptiveClusteringAttention in the model (e.g. '
                "encoder.layer_cfg.self_attn_cfg.type='AdaptiveClusteringAttention'); without "
                'it both branches are the same exact DETR')
        self.act_loss_weight = float(act_loss_weight)
        self.full_loss_weight = float(full_loss_weight)
        self.loss_kd = MODELS.build(loss_kd)
        self.detach_full = bool(detach_full)
        self.test_branch = test_branch

    @property
    def test_branch(self) -> str:
        return self._test_branch

    @test_branch.setter
    def test_branch(self, value: str) -> None:
        if value not in _TEST_BRANCHES:
            raise ValueError(f'test_branch must be one of {_TEST_BRANCHES}, got {value!r}')
        self._test_branch = value

    def branch(self, name: str) -> contextlib.AbstractContextManager:
        """Context in which the transformer runs as branch ``name`` ('act' or 'full')."""
        if name not in ('act', 'full'):
            raise ValueError(f"branch must be 'act' or 'full', got {name!r}")
        return act_exact_mode(self, enabled=name == 'full')

    def loss(self, batch_inputs: Tensor, batch_data_samples: SampleList) -> Dict[str, Tensor]:
        img_feats = self.extract_feat(batch_inputs)
        losses, boxes = {}, {}
        for name, weight in (('act', self.act_loss_weight), ('full', self.full_loss_weight)):
            with self.branch(name), \
                    ModuleOutputRecorder('bbox_head', index=1).register(self) as recorder:
                head_inputs = self.forward_transformer(img_feats, batch_data_samples)
                branch_losses = self.bbox_head.loss(
                    **head_inputs, batch_data_samples=batch_data_samples)
                boxes[name] = recorder.last  # (L, B, Q, 4)
            losses.update({f'{name}.{key}': _scale(value, weight)
                           for key, value in branch_losses.items()})
        full_boxes = boxes['full'].detach() if self.detach_full else boxes['full']
        losses.update(self.loss_distill(boxes['act'], full_boxes))
        return losses

    def loss_distill(self, act_boxes: Tensor, full_boxes: Tensor) -> Dict[str, Tensor]:
        """KD terms over decoder layers: ``d{i}.loss_kd`` for layer i, ``loss_kd`` for the last."""
        num_layers = act_boxes.shape[0]
        return {('loss_kd' if layer == num_layers - 1 else f'd{layer}.loss_kd'):
                self.loss_kd(act_boxes[layer], full_boxes[layer])
                for layer in range(num_layers)}

    def predict(self,
                batch_inputs: Tensor,
                batch_data_samples: SampleList,
                rescale: bool = True) -> SampleList:
        img_feats = self.extract_feat(batch_inputs)
        names = ('act', 'full') if self.test_branch == 'both' else (self.test_branch, )
        results = {}
        for name in names:
            with self.branch(name):
                head_inputs = self.forward_transformer(img_feats, batch_data_samples)
            results[name] = self.bbox_head.predict(
                **head_inputs, rescale=rescale, batch_data_samples=batch_data_samples)
        batch_data_samples = self.add_pred_to_datasample(batch_data_samples, results[names[0]])
        if self.test_branch == 'both':
            for data_sample, full_result in zip(batch_data_samples, results['full']):
                data_sample.full_pred_instances = float32_instances(full_result)
        return batch_data_samples

    def _forward(self, batch_inputs: Tensor,
                 batch_data_samples: SampleList = None) -> Tuple[List[Tensor]]:
        name = 'act' if self.test_branch == 'both' else self.test_branch
        with self.branch(name):
            return super()._forward(batch_inputs, batch_data_samples)


@MODELS.register_module()
class MTKDDETR(MTKDMixin, DETRX):
    """mmdet's DETR with an ACT encoder, trained by MTKD against its own exact-attention branch.

    Parameter names are DETR's: an mmdet DETR checkpoint loads strictly.
    """


@MODELS.register_module()
class MTKDConditionalDETR(MTKDMixin, ConditionalDETRX):
    """MTKD around mmdet's Conditional DETR with an ACT encoder; checkpoints load strictly."""


def _scale(value, weight: float):
    if isinstance(value, torch.Tensor):
        return value * weight
    return [v * weight for v in value]
