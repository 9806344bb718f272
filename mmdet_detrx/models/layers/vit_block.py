"""The pre-norm transformer encoder layer of ViT (and of TNT's inner and outer transformers).

Dosovitskiy et al., ICLR 2021 (https://arxiv.org/abs/2010.11929), eq. 2-3::

    x = x + DropPath(Attn(LN1(x)))
    x = x + DropPath(FFN(LN2(x)))        # FFN: Linear, GELU, Linear

with stochastic depth (Huang et al. 2016) as ``DropPath``. Parameter names follow mmpretrain
(``ln1``, ``attn.qkv``, ``attn.proj``, ``ln2``, ``ffn.layers.0.0``, ``ffn.layers.1``); the FFN
is mmcv's.

Shapes: ``(B, N, C) -> (B, N, C)``.
"""
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from mmcv.cnn import build_norm_layer
from mmcv.cnn.bricks.drop import build_dropout
from mmcv.cnn.bricks.transformer import FFN

from .self_attention import MultiheadSelfAttention

__all__ = ['ViTBlock', 'checkpoint_if']


class ViTBlock(nn.Module):
    """Pre-norm self-attention + FFN block.

    Args:
        embed_dims (int): token channels ``C``.
        num_heads (int): attention heads; must divide ``embed_dims``.
        feedforward_channels (int): hidden width of the FFN (``4 * C`` in ViT).
        qkv_bias (bool): bias in the qkv projection. Default: True.
        drop_rate (float): dropout after the attention and FFN projections. Default: 0.
        attn_drop_rate (float): dropout on the attention weights. Default: 0.
        drop_path_rate (float): stochastic depth of both residual branches. Default: 0.
        act_cfg (dict): FFN activation. Default: ``dict(type='GELU')``.
        norm_cfg (dict): norm of ``ln1``/``ln2``. Default: ``dict(type='LN', eps=1e-6)``.
        with_cp (bool): recompute the block in backward (activation checkpointing) to save
            memory while training. Default: False.
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 feedforward_channels: int,
                 qkv_bias: bool = True,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.,
                 act_cfg: dict = dict(type='GELU'),
                 norm_cfg: dict = dict(type='LN', eps=1e-6),
                 with_cp: bool = False):
        super().__init__()
        if not 0 <= drop_path_rate < 1:
            raise ValueError(f'drop_path_rate must be in [0, 1), got {drop_path_rate}')
        self.with_cp = with_cp
        self.ln1 = build_norm_layer(norm_cfg, embed_dims)[1]
        self.attn = MultiheadSelfAttention(
            embed_dims, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop_rate,
            proj_drop=drop_rate)
        self.ln2 = build_norm_layer(norm_cfg, embed_dims)[1]
        drop_path = dict(type='DropPath', drop_prob=drop_path_rate) if drop_path_rate else None
        self.ffn = FFN(
            embed_dims=embed_dims,
            feedforward_channels=feedforward_channels,
            num_fcs=2,
            act_cfg=act_cfg,
            ffn_drop=drop_rate,
            dropout_layer=drop_path,
            add_identity=True)
        self.drop_path = build_dropout(drop_path) if drop_path else nn.Identity()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.ln1(x)))
        return self.ffn(self.ln2(x), identity=x)  # x + DropPath(FFN(LN2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint_if(self.with_cp and self.training, self._forward, x)


def checkpoint_if(enabled: bool, function: Callable[..., Any], *tensors: torch.Tensor) -> Any:
    """``function(*tensors)``, recomputed in backward instead of keeping its activations
    (non-reentrant activation checkpointing) when ``enabled`` and a tensor needs gradients."""
    if enabled and any(t.requires_grad for t in tensors):
        return cp.checkpoint(function, *tensors, use_reentrant=False)
    return function(*tensors)
