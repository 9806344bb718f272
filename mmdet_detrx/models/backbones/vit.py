"""ViT (Vision Transformer) as a detection backbone: any input size, timm checkpoints.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at
Scale", ICLR 2021 (https://arxiv.org/abs/2010.11929). The image is cut into ``patch_size``
patches (zero-padded at the bottom/right to whole patches), each linearly embedded; a class
token is prepended, learned absolute position embeddings are added (interpolated bicubically
from the pretraining grid for other grids, see :class:`AbsolutePositionEmbedding`) and
``num_layers`` pre-norm transformer blocks follow. The class token takes part in attention
(as in pretraining) but is not in the outputs.

``arch='tiny'|'small'|'base'`` are the architectures of timm's ``vit_{tiny,small,base}_
patch16_224``, whose state dicts load through ``init_cfg=dict(type='Pretrained',
checkpoint=PATH)`` (keys converted by :meth:`ViT.convert_checkpoint`).

Shapes: input ``(B, 3, H, W)`` of any size; each output ``(B, C, ceil(H / p), ceil(W / p))``
(stride ``p = patch_size``). Use a neck such as ``SimpleFeaturePyramid`` for multi-scale maps.
"""
from functools import partial
from typing import Dict, Sequence, Tuple

import torch
import torch.nn as nn
from mmcv.cnn import build_norm_layer
from mmcv.cnn.bricks.transformer import PatchEmbed
from mmengine.model import BaseModule

from mmdet.registry import MODELS
from ..layers.vit_block import ViTBlock
from .token_backbone import TokenBackboneMixin, check_heads, init_linear_and_norm, resolve_arch
from .token_checkpoint import (drop_class_token, drop_classifier, rename_keys,
                               timm_block_rules)

__all__ = ['ViT']


# timm's ViT names -> ours (first match wins; anything unmatched is reported as unexpected).
_TIMM_VIT_RULES = (
    (r'^pos_embed$', 'pos_embed.weight'),
    (r'^patch_embed\.proj\.', 'patch_embed.projection.'),
    *timm_block_rules('norm1', 'attn', 'norm2', 'mlp'),
)

_ARCHS = {
    # timm's vit_{tiny,small,base}_patch16_224
    **dict.fromkeys(('t', 'tiny'), dict(embed_dims=192, num_layers=12, num_heads=3,
                                        feedforward_channels=768)),
    **dict.fromkeys(('s', 'small'), dict(embed_dims=384, num_layers=12, num_heads=6,
                                         feedforward_channels=1536)),
    **dict.fromkeys(('b', 'base'), dict(embed_dims=768, num_layers=12, num_heads=12,
                                        feedforward_channels=3072)),
}


@MODELS.register_module()
class ViT(TokenBackboneMixin, BaseModule):
    """Vision Transformer backbone for detection.

    Args:
        arch (str | dict): ``'tiny'``/``'t'``, ``'small'``/``'s'``, ``'base'``/``'b'`` (timm's
            ``vit_{tiny,small,base}_patch16_224``), or a dict with ``embed_dims``,
            ``num_layers``, ``num_heads``, ``feedforward_channels``. Default: ``'base'``.
        patch_size (int): patch side, the output stride. Default: 16.
        in_channels (int): image channels. Default: 3.
        pretrain_img_size (int | tuple[int, int]): image size the position embedding was
            learnt for; its grid is ``pretrain_img_size / patch_size`` (must divide). Default: 224.
        out_indices (Sequence[int]): blocks whose outputs are returned (negative: from the
            end). Default: ``(-1,)``, the last block after the final norm.
        qkv_bias (bool): bias in the qkv projections. Default: True.
        drop_rate (float): dropout after the embedding and in each block. Default: 0.
        attn_drop_rate (float): dropout on attention weights. Default: 0.
        drop_path_rate (float): stochastic depth of the last block, linearly increasing from
            0 at the first. Default: 0.
        with_cls_token (bool): keep a class token in the sequence (needed to reproduce a
            checkpoint that has one; never in the outputs). Default: True.
        final_norm (bool): LayerNorm after the last block. Default: True.
        norm_cfg (dict): norm layers. Default: ``dict(type='LN', eps=1e-6)`` (timm's).
        act_cfg (dict): FFN activation. Default: ``dict(type='GELU')``.
        interpolate_mode (str): position-embedding resizing. Default: ``'bicubic'``.
        frozen_stages (int): -1 freezes nothing, 0 the patch/position/class embeddings, k also
            blocks 0..k-1 (and the final norm when k = num_layers). Default: -1.
        with_cp (bool): activation checkpointing per block while training. Default: False.
        init_cfg (dict, optional): ``dict(type='Pretrained', checkpoint=PATH)`` loads a timm
            (or our own / a detector's) state dict, strictly after key conversion.
    """

    def __init__(self,
                 arch='base',
                 patch_size: int = 16,
                 in_channels: int = 3,
                 pretrain_img_size=224,
                 out_indices: Sequence[int] = (-1, ),
                 qkv_bias: bool = True,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.,
                 with_cls_token: bool = True,
                 final_norm: bool = True,
                 norm_cfg: dict = dict(type='LN', eps=1e-6),
                 act_cfg: dict = dict(type='GELU'),
                 interpolate_mode: str = 'bicubic',
                 frozen_stages: int = -1,
                 with_cp: bool = False,
                 init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        arch = resolve_arch(arch, _ARCHS, 'ViT')
        self.embed_dims = arch['embed_dims']
        self.num_layers = arch['num_layers']
        num_heads = arch['num_heads']
        self._init_layout(patch_size, pretrain_img_size, out_indices, frozen_stages,
                          with_cls_token)
        check_heads(arch, 'embed_dims', 'num_heads')

        self.patch_embed = PatchEmbed(
            in_channels=in_channels, embed_dims=self.embed_dims, conv_type='Conv2d',
            kernel_size=patch_size, stride=patch_size, padding='corner', bias=True)
        self._init_token_embeddings(partial(nn.init.normal_, std=1e-6), interpolate_mode,
                                    drop_rate)

        drop_path_rates = torch.linspace(0, drop_path_rate, self.num_layers).tolist()
        self.layers = nn.ModuleList([
            ViTBlock(self.embed_dims, num_heads, arch['feedforward_channels'],
                     qkv_bias=qkv_bias, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                     drop_path_rate=drop_path_rates[i], act_cfg=act_cfg, norm_cfg=norm_cfg,
                     with_cp=with_cp) for i in range(self.num_layers)
        ])
        self.norm = build_norm_layer(norm_cfg, self.embed_dims)[1] if final_norm else None
        self.layers.apply(init_linear_and_norm)
        self._freeze_stages()

    def embedding_modules(self):
        params = [self.cls_token] if self.cls_token is not None else []
        return [self.patch_embed, self.pos_embed, self.drop_after_pos, *params]

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        tokens, grid = self.patch_embed(x)  # (B, Hp*Wp, C), (Hp, Wp)
        tokens = self._add_token_embeddings(tokens, grid)  # (B, E + Hp*Wp, C)
        outs = []
        for i, layer in enumerate(self.layers):
            tokens = self._after_block(i, layer(tokens), grid, outs)
        return tuple(outs)

    def convert_checkpoint(self, state: Dict[str, torch.Tensor]):
        """A timm ``VisionTransformer`` (or our own) state dict -> this model's names.

        Returns ``(state, dropped_keys)``; the classifier (``head``) is dropped.
        """
        state, dropped = drop_classifier(state)
        if any(k.startswith('blocks.') or k.startswith('patch_embed.proj.') for k in state):
            state = rename_keys(state, _TIMM_VIT_RULES)
        if not self.with_cls_token:
            state = drop_class_token(state, 'pos_embed.weight', dropped)
        return state, dropped
