"""LayerNorm over the channels of an NCHW map, registered as ``'LN2d'``.

The normalisation of ViTDet's simple feature pyramid (Li et al., "Exploring Plain Vision
Transformer Backbones for Object Detection", ECCV 2022, https://arxiv.org/abs/2203.16527):
each pixel's C-vector is normalised on its own, as ``nn.LayerNorm`` does for tokens.

Shapes: ``(B, C, H, W) -> (B, C, H, W)``.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmdet.registry import MODELS

__all__ = ['LayerNorm2d']


@MODELS.register_module('LN2d')
class LayerNorm2d(nn.LayerNorm):
    """``nn.LayerNorm(num_channels)`` applied at every position of an NCHW tensor."""

    _abbr_ = 'ln'  # mmcv's build_norm_layer names the module ``ln``

    def __init__(self, num_channels: int, eps: float = 1e-6, **kwargs):
        super().__init__(num_channels, eps=eps, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f'LayerNorm2d expects (B, C, H, W), got {tuple(x.shape)}')
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)  # (B, C, H, W)
