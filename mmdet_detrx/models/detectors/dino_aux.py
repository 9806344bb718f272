"""DINOX with a dense auxiliary head on its encoder output, for training from scratch fast.

DETR-style training matches each object to ONE query: at most a handful of positives per image
reach the backbone and encoder, which is what makes DETRs slow to converge, and slowest of all
with a backbone trained from scratch (no ImageNet weights can be downloaded here). Co-DETR
(Zong et al., `DETRs with Collaborative Hybrid Assignments Training
<https://arxiv.org/abs/2211.12860>`_, ICCV 2023) adds one-to-many heads on the encoder output
during training. :class:`DINOXAux` takes that idea in its simplest form: any mmdet dense head
(``aux_head``, e.g. an ``FCOSHead``) reads the encoder's multi-scale output (``memory`` folded
back into its feature maps) and its losses, prefixed ``aux_``, join DINO's. Every location inside
an object supervises the backbone and encoder. The auxiliary head is not run at inference, so
predictions, speed and the exported graph are DINOX's.
"""
from typing import Dict, Optional

from mmdet.registry import MODELS

from .detrx import DINOX

__all__ = ['DINOXAux']


@MODELS.register_module()
class DINOXAux(DINOX):
    """:class:`~mmdet_detrx.models.detectors.DINOX` plus ``aux_head`` trained on the encoder
    output.

    Args:
        aux_head (dict): config of an mmdet dense head whose ``loss(feats, data_samples)`` takes
            the encoder's feature maps, one per level (``in_channels`` = ``embed_dims``,
            ``strides`` = the levels'). Its own ``train_cfg`` (assigner) goes inside it.
        *args, **kwargs: :class:`DINOX`'s.
    """

    def __init__(self, *args, aux_head: Optional[Dict] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if aux_head is None:
            raise TypeError('DINOXAux needs aux_head (e.g. an FCOSHead config); use DINOX '
                            'without one')
        self.aux_head = MODELS.build(aux_head)
        self._aux_memory = None

    def forward_encoder(self, *args, **kwargs) -> Dict:
        outputs = super().forward_encoder(*args, **kwargs)
        if self.training:
            self._aux_memory = (outputs['memory'], outputs['spatial_shapes'])
        return outputs

    def loss(self, batch_inputs, batch_data_samples) -> Dict:
        losses = super().loss(batch_inputs, batch_data_samples)
        memory, spatial_shapes = self._aux_memory
        self._aux_memory = None
        batch, _, channels = memory.shape
        maps, start = [], 0
        for height, width in spatial_shapes.tolist():
            level = memory[:, start:start + height * width]
            maps.append(level.transpose(1, 2).reshape(batch, channels, height, width))
            start += height * width
        aux_losses = self.aux_head.loss(tuple(maps), batch_data_samples)
        losses.update({f'aux_{name}': value for name, value in aux_losses.items()})
        return losses
