"""One TNT block: an inner transformer over each patch's visual words, then an outer one.

Han et al., "Transformer in Transformer", NeurIPS 2021 (https://arxiv.org/abs/2103.00112),
eq. 4-6 (with the LayerNorm after the projection of the released models)::

    Y' = Y + DropPath(MSA(LN(Y)));  Y = Y' + DropPath(MLP(LN(Y')))      # inner, per patch
    Z  = Z + LN(W · LN(vec(Y)))                                         # words -> patch
    Z' = Z + DropPath(MSA(LN(Z)));  Z = Z' + DropPath(MLP(LN(Z')))      # outer

The inner and outer transformers are :class:`ViTBlock`s; leading extra tokens of ``Z`` (the
class token) take no visual-word projection.

Shapes: pixel (inner) tokens ``(B * N, P, Ci)``, patch (outer) tokens ``(B, E + N, C)`` with
``E`` extra tokens; both are returned updated.
"""
from typing import Tuple

import torch
import torch.nn as nn
from mmcv.cnn import build_norm_layer

from .vit_block import ViTBlock, checkpoint_if

__all__ = ['TNTBlock']


class TNTBlock(nn.Module):
    """Inner :class:`ViTBlock` + visual-word projection + outer :class:`ViTBlock`.

    Args:
        embed_dims (int): outer (patch) token channels ``C``.
        num_heads (int): outer attention heads; must divide ``embed_dims``.
        inner_dims (int): inner (visual word) channels ``Ci``.
        inner_num_heads (int): inner attention heads; must divide ``inner_dims``.
        num_words (int): visual words per patch ``P``.
        mlp_ratio (float): outer FFN width / ``embed_dims`` (the inner FFN is ``4 * Ci``,
            as released). Default: 4.
        num_extra_tokens (int): leading outer tokens without visual words. Default: 1.
        qkv_bias (bool): bias in the q/k/v projections of both transformers. Default: False
            (TNT's).
        norm_cfg (dict): every norm. Default: ``dict(type='LN', eps=1e-5)`` (TNT's).
        with_cp (bool): recompute the whole block in backward. Default: False.
        **block_cfg: the other :class:`ViTBlock` arguments (``drop_rate``,
            ``attn_drop_rate``, ``drop_path_rate``, ``act_cfg``), for both transformers.
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 inner_dims: int,
                 inner_num_heads: int,
                 num_words: int,
                 mlp_ratio: float = 4.,
                 num_extra_tokens: int = 1,
                 qkv_bias: bool = False,
                 norm_cfg: dict = dict(type='LN', eps=1e-5),
                 with_cp: bool = False,
                 **block_cfg):
        super().__init__()
        common = dict(qkv_bias=qkv_bias, norm_cfg=norm_cfg, **block_cfg)
        try:
            self.inner = ViTBlock(inner_dims, inner_num_heads, 4 * inner_dims, **common)
        except ValueError as error:
            raise ValueError(f'inner transformer: {error} (inner_dims / inner_num_heads)') \
                from None
        self.proj_norm1 = build_norm_layer(norm_cfg, num_words * inner_dims)[1]
        self.proj = nn.Linear(num_words * inner_dims, embed_dims, bias=False)
        self.proj_norm2 = build_norm_layer(norm_cfg, embed_dims)[1]
        self.outer = ViTBlock(embed_dims, num_heads, int(embed_dims * mlp_ratio), **common)
        self.num_extra_tokens = num_extra_tokens
        self.with_cp = with_cp

    def _forward(self, pixel_tokens: torch.Tensor,
                 patch_tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        pixel_tokens = self.inner(pixel_tokens)  # (B*N, P, Ci)
        batch, num_tokens, _ = patch_tokens.shape
        extra = self.num_extra_tokens
        words = self.proj_norm1(pixel_tokens.reshape(batch, num_tokens - extra, -1))  # (B,N,P*Ci)
        patch_tokens = torch.cat(
            [patch_tokens[:, :extra],
             patch_tokens[:, extra:] + self.proj_norm2(self.proj(words))], dim=1)  # (B, E+N, C)
        return pixel_tokens, self.outer(patch_tokens)

    def forward(self, pixel_tokens: torch.Tensor,
                patch_tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return checkpoint_if(self.with_cp and self.training, self._forward, pixel_tokens,
                             patch_tokens)
