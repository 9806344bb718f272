"""ViTDet's simple feature pyramid: multi-scale maps from one stride-16 map of a plain ViT.

Li, Mao, Girshick, He, "Exploring Plain Vision Transformer Backbones for Object Detection",
ECCV 2022 (https://arxiv.org/abs/2203.16527), sec. 3 / fig. 2(c): from the last (stride-16)
backbone map, scale 4 is two 2x2 stride-2 deconvolutions (LayerNorm + GELU between), scale 2 one
deconvolution, scale 1 the map itself, scale 1/2 a 2x2 stride-2 max-pool; each then has a 1x1
and a 3x3 convolution to ``out_channels``, each followed by LayerNorm. Extra coarser levels (as
mmdet's FPN adds for RPN, or Deformable DETR's strided convolution) follow the last one.

Shapes: input a tuple whose ``in_index`` entry is ``(B, C, H, W)`` at stride ``s`` (16 for
ViT/TNT); outputs ``(B, out_channels, ~H * f, ~W * f)`` for each scale factor ``f`` (strides
``s / f``), then ``num_outs - len(scale_factors)`` extra levels, each half the previous.
"""
from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import ConvModule, build_activation_layer, build_norm_layer
from mmengine.model import BaseModule

from mmdet.registry import MODELS
from ..layers.layer_norm_2d import LayerNorm2d

__all__ = ['SimpleFeaturePyramid']

_SCALE_FACTORS = (4.0, 2.0, 1.0, 0.5)


def _resolve_norm(norm_cfg):
    """'LN2d' needs no default registry scope (e.g. in tools that build modules directly)."""
    if norm_cfg is not None and norm_cfg.get('type') == 'LN2d':
        norm_cfg = dict(norm_cfg, type=LayerNorm2d)
    return norm_cfg


@MODELS.register_module()
class SimpleFeaturePyramid(BaseModule):
    """Simple feature pyramid neck (ViTDet).

    Args:
        in_channels (int): channels ``C`` of the backbone map (384 for ViT-S/TNT-S).
        out_channels (int): channels of every output level. Default: 256.
        scale_factors (Sequence[float]): resolutions relative to the input map, from
            ``(4.0, 2.0, 1.0, 0.5)`` (strides 4, 8, 16, 32 for a stride-16 map), finest first.
            Default: ``(4.0, 2.0, 1.0, 0.5)``.
        num_outs (int, optional): output levels; levels beyond the scale factors are extra,
            each at half the resolution of the one before. Default: ``len(scale_factors)``.
        extra_level (str): how extra levels are made: ``'maxpool'`` (1x1 max-pool, stride 2,
            as mmdet's FPN without extra convs; for RPN's stride-64 level) or ``'conv'`` (3x3
            stride-2 convolution + norm, as Deformable DETR/DINO's ChannelMapper). Default:
            ``'maxpool'``.
        in_index (int): which backbone output to use. Default: -1.
        norm_cfg (dict): norm after every convolution. Default: ``dict(type='LN2d')``.
        act_cfg (dict): activation between the two deconvolutions of scale 4. Default: GELU.
        init_cfg (dict, optional): mmengine initialisation config.
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int = 256,
                 scale_factors: Sequence[float] = _SCALE_FACTORS,
                 num_outs: int = None,
                 extra_level: str = 'maxpool',
                 in_index: int = -1,
                 norm_cfg: dict = dict(type='LN2d'),
                 act_cfg: dict = dict(type='GELU'),
                 init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        if isinstance(in_channels, (list, tuple)):  # a backbone's per-output channel list
            in_channels = in_channels[in_index]
        if not isinstance(in_channels, int) or in_channels <= 0:
            raise ValueError(f'in_channels must be a positive int, got {in_channels!r}')
        scale_factors = tuple(float(f) for f in scale_factors)
        if (not scale_factors or any(f not in _SCALE_FACTORS for f in scale_factors)
                or list(scale_factors) != sorted(set(scale_factors), reverse=True)):
            raise ValueError(f'scale_factors={scale_factors} must be distinct values from '
                             f'{_SCALE_FACTORS}, finest first')
        if 4.0 in scale_factors and in_channels % 4:
            raise ValueError(f'scale factor 4 halves the channels twice: in_channels='
                             f'{in_channels} must be divisible by 4')
        if 2.0 in scale_factors and in_channels % 2:
            raise ValueError(f'scale factor 2 halves the channels: in_channels={in_channels} '
                             'must be even')
        num_outs = len(scale_factors) if num_outs is None else num_outs
        if not isinstance(num_outs, int) or num_outs < len(scale_factors):
            raise ValueError(f'num_outs={num_outs!r} must be at least the '
                             f'{len(scale_factors)} scale_factors')
        if extra_level not in ('maxpool', 'conv'):
            raise ValueError(f"extra_level must be 'maxpool' or 'conv', got {extra_level!r}")
        norm_cfg = _resolve_norm(norm_cfg)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.scale_factors = scale_factors
        self.num_outs = num_outs
        self.extra_level = extra_level
        self.in_index = in_index

        self.stages = nn.ModuleList()
        for factor in scale_factors:
            resample, channels = self._resample(factor, in_channels, norm_cfg, act_cfg)
            self.stages.append(nn.Sequential(
                resample,
                ConvModule(channels, out_channels, 1, norm_cfg=norm_cfg, act_cfg=None),
                ConvModule(out_channels, out_channels, 3, padding=1, norm_cfg=norm_cfg,
                           act_cfg=None)))
        self.extra_convs = nn.ModuleList()
        if extra_level == 'conv':
            for _ in range(num_outs - len(scale_factors)):
                self.extra_convs.append(ConvModule(
                    out_channels, out_channels, 3, stride=2, padding=1, norm_cfg=norm_cfg,
                    act_cfg=None))

    @staticmethod
    def _resample(factor, channels, norm_cfg, act_cfg) -> Tuple[nn.Module, int]:
        if factor == 4.0:
            return nn.Sequential(
                nn.ConvTranspose2d(channels, channels // 2, 2, stride=2),
                build_norm_layer(norm_cfg, channels // 2)[1],
                build_activation_layer(act_cfg),
                nn.ConvTranspose2d(channels // 2, channels // 4, 2, stride=2)), channels // 4
        if factor == 2.0:
            return nn.ConvTranspose2d(channels, channels // 2, 2, stride=2), channels // 2
        if factor == 1.0:
            return nn.Identity(), channels
        # ceil_mode: an odd map gives ceil(H / 2), as a stride-2 convolution of a ResNet does
        return nn.MaxPool2d(2, stride=2, ceil_mode=True), channels

    def forward(self, inputs: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        x = inputs[self.in_index] if isinstance(inputs, (list, tuple)) else inputs
        outs = [stage(x) for stage in self.stages]
        for i in range(self.num_outs - len(self.scale_factors)):
            if self.extra_level == 'conv':
                outs.append(self.extra_convs[i](outs[-1]))
            else:
                outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return tuple(outs)
