"""TNT (Transformer in Transformer) as a detection backbone: any input size, timm checkpoints.

Han, Xiao, Wu, Guo, Xu, Wang, "Transformer in Transformer", NeurIPS 2021
(https://arxiv.org/abs/2103.00112). Each 16x16 patch is a "visual sentence" of 4x4 "visual
words" (:class:`PixelEmbed`): an inner transformer models the words of each patch, their
flattened result is projected and added to the patch's embedding, and an outer transformer
models the patches (:class:`TNTBlock`). Position embeddings exist at both levels, as the paper
found best: the inner one per word position (the same for every patch, any input size), the
outer one per patch (interpolated bicubically from the pretraining grid, see
:class:`AbsolutePositionEmbedding`). The class token takes part in attention but is not in the
outputs.

``arch='small'|'base'`` are the architectures of timm's ``tnt_{s,b}_patch16_224``, whose state
dicts load through ``init_cfg=dict(type='Pretrained', checkpoint=PATH)`` (keys converted by
:meth:`TNT.convert_checkpoint`).

Shapes: input ``(B, 3, H, W)`` of any size; each output ``(B, C, ceil(H / 16), ceil(W / 16))``.
"""
import re
from functools import partial
from typing import Dict, Sequence, Tuple

import torch
import torch.nn as nn
from mmcv.cnn import build_norm_layer
from mmengine.model import BaseModule

from mmdet.registry import MODELS
from ..layers.pixel_embed import PixelEmbed
from ..layers.tnt_block import TNTBlock
from .token_backbone import TokenBackboneMixin, check_heads, init_linear_and_norm, resolve_arch
from .token_checkpoint import (drop_class_token, drop_classifier, rename_keys,
                               timm_block_rules)

__all__ = ['TNT']

_ARCHS = {
    # timm's tnt_s_patch16_224 / tnt_b_patch16_224
    **dict.fromkeys(('s', 'small'), dict(embed_dims=384, inner_dims=24, num_layers=12,
                                         num_heads=6, inner_num_heads=4, mlp_ratio=4.)),
    **dict.fromkeys(('b', 'base'), dict(embed_dims=640, inner_dims=40, num_layers=12,
                                        num_heads=10, inner_num_heads=4, mlp_ratio=4.)),
}

# timm's TNT names -> ours (first match wins; unmatched keys are reported as unexpected).
# The separate q/k and v projections are stacked into one qkv afterwards.
_TIMM_TNT_RULES = (
    (r'^patch_pos$', 'pos_embed.weight'),
    (r'^pixel_pos$', 'pixel_embed.pos_embed'),
    (r'^pixel_embed\.proj\.', 'pixel_embed.projection.'),
    (r'^norm1_proj\.', 'proj_norm1.'),
    (r'^norm2_proj\.', 'proj_norm2.'),
    *timm_block_rules('norm_in', 'attn_in', 'norm_mlp_in', 'mlp_in', block='inner.'),
    (r'^blocks\.(\d+)\.norm1_proj\.', r'layers.\1.proj_norm1.'),
    (r'^blocks\.(\d+)\.norm2_proj\.', r'layers.\1.proj_norm2.'),
    (r'^blocks\.(\d+)\.proj\.', r'layers.\1.proj.'),
    *timm_block_rules('norm_out', 'attn_out', 'norm_mlp', 'mlp', block='outer.'),
)


def _stack_qk_v(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``X.attn.qk.{weight,bias}`` + ``X.attn.v.*`` -> ``X.attn.qkv.*`` (q, k, v order)."""
    state = dict(state)
    for key in [k for k in state if re.search(r'\.attn\.qk\.(weight|bias)$', k)]:
        v_key = key.replace('.attn.qk.', '.attn.v.')
        if v_key in state:  # otherwise both stay and are reported as unexpected
            state[key.replace('.attn.qk.', '.attn.qkv.')] = torch.cat(
                [state.pop(key), state.pop(v_key)], dim=0)
    return state


@MODELS.register_module()
class TNT(TokenBackboneMixin, BaseModule):
    """Transformer-in-Transformer backbone for detection.

    Args:
        arch (str | dict): ``'small'``/``'s'``, ``'base'``/``'b'`` (timm's
            ``tnt_{s,b}_patch16_224``), or a dict with ``embed_dims``, ``inner_dims``,
            ``num_layers``, ``num_heads``, ``inner_num_heads``, ``mlp_ratio``.
            Default: ``'small'``.
        patch_size (int): patch (outer token) side, the output stride. Default: 16.
        inner_patch_size (int): visual word side in pixels; must divide ``patch_size``.
            Default: 4.
        in_channels (int): image channels. Default: 3.
        pretrain_img_size (int | tuple[int, int]): image size of the outer position
            embedding's grid (must be divisible by ``patch_size``). Default: 224.
        out_indices (Sequence[int]): blocks whose patch tokens are returned. Default:
            ``(-1,)``, the last block after the final norm.
        qkv_bias (bool): bias in the q/k/v projections. Default: False (TNT's).
        drop_rate, attn_drop_rate, drop_path_rate: as in :class:`ViT` (stochastic depth is
            applied in the inner and outer transformers of each block).
        with_cls_token (bool): keep the class token in the sequence. Default: True.
        final_norm (bool): LayerNorm after the last block. Default: True.
        norm_cfg (dict): norm layers. Default: ``dict(type='LN', eps=1e-5)`` (TNT's).
        act_cfg (dict): FFN activation. Default: ``dict(type='GELU')``.
        interpolate_mode (str): outer position-embedding resizing. Default: ``'bicubic'``.
        frozen_stages (int): -1 nothing, 0 the embeddings (visual words, projection, positions,
            class token), k also blocks 0..k-1 (and the final norm at k = num_layers).
        with_cp (bool): activation checkpointing per block while training. Default: False.
        init_cfg (dict, optional): ``dict(type='Pretrained', checkpoint=PATH)`` loads a timm
            (or our own / a detector's) state dict, strictly after key conversion.
    """

    def __init__(self,
                 arch='small',
                 patch_size: int = 16,
                 inner_patch_size: int = 4,
                 in_channels: int = 3,
                 pretrain_img_size=224,
                 out_indices: Sequence[int] = (-1, ),
                 qkv_bias: bool = False,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.,
                 with_cls_token: bool = True,
                 final_norm: bool = True,
                 norm_cfg: dict = dict(type='LN', eps=1e-5),
                 act_cfg: dict = dict(type='GELU'),
                 interpolate_mode: str = 'bicubic',
                 frozen_stages: int = -1,
                 with_cp: bool = False,
                 init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        arch = resolve_arch(arch, _ARCHS, 'TNT')
        self.embed_dims = embed_dims = arch['embed_dims']
        inner_dims = arch['inner_dims']
        self.num_layers = arch['num_layers']
        self._init_layout(patch_size, pretrain_img_size, out_indices, frozen_stages,
                          with_cls_token)
        check_heads(arch, 'embed_dims', 'num_heads')
        check_heads(arch, 'inner_dims', 'inner_num_heads')

        self.pixel_embed = PixelEmbed(in_channels, inner_dims, patch_size, inner_patch_size)
        num_words = self.pixel_embed.num_words
        self.proj_norm1 = build_norm_layer(norm_cfg, num_words * inner_dims)[1]
        self.proj = nn.Linear(num_words * inner_dims, embed_dims)
        self.proj_norm2 = build_norm_layer(norm_cfg, embed_dims)[1]
        self._init_token_embeddings(partial(nn.init.trunc_normal_, std=0.02), interpolate_mode,
                                    drop_rate)

        drop_path_rates = torch.linspace(0, drop_path_rate, self.num_layers).tolist()
        self.layers = nn.ModuleList([
            TNTBlock(embed_dims, arch['num_heads'], inner_dims, arch['inner_num_heads'],
                     num_words, mlp_ratio=arch['mlp_ratio'],
                     num_extra_tokens=self.num_extra_tokens, qkv_bias=qkv_bias,
                     drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                     drop_path_rate=drop_path_rates[i], act_cfg=act_cfg, norm_cfg=norm_cfg,
                     with_cp=with_cp) for i in range(self.num_layers)
        ])
        self.norm = build_norm_layer(norm_cfg, embed_dims)[1] if final_norm else None
        self.layers.apply(init_linear_and_norm)
        init_linear_and_norm(self.proj)
        self._freeze_stages()

    def embedding_modules(self):
        params = [self.cls_token] if self.cls_token is not None else []
        return [self.pixel_embed, self.proj_norm1, self.proj, self.proj_norm2, self.pos_embed,
                self.drop_after_pos, *params]

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        batch = x.shape[0]
        pixel_tokens, grid = self.pixel_embed(x)  # (B*Hp*Wp, P, Ci), (Hp, Wp)
        words = pixel_tokens.reshape(batch, grid[0] * grid[1], -1)  # (B, Hp*Wp, P*Ci)
        patch_tokens = self.proj_norm2(self.proj(self.proj_norm1(words)))  # (B, Hp*Wp, C)
        patch_tokens = self._add_token_embeddings(patch_tokens, grid)  # (B, E + Hp*Wp, C)
        outs = []
        for i, layer in enumerate(self.layers):
            pixel_tokens, patch_tokens = layer(pixel_tokens, patch_tokens)
            patch_tokens = self._after_block(i, patch_tokens, grid, outs)
        return tuple(outs)

    def convert_checkpoint(self, state: Dict[str, torch.Tensor]):
        """A timm ``TNT`` (non-legacy) or our own state dict -> this model's names.

        Returns ``(state, dropped_keys)``; the classifier (``head``) is dropped.
        """
        state, dropped = drop_classifier(state)
        if 'patch_pos' in state or any(k.startswith('blocks.') for k in state):
            state = _stack_qk_v(rename_keys(state, _TIMM_TNT_RULES))
        if not self.with_cls_token:
            state = drop_class_token(state, 'pos_embed.weight', dropped)
        return state, dropped
