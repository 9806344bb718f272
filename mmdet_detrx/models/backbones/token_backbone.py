"""What the token (ViT-family) backbones share: arguments, class token and positions, outputs.

ViT (:mod:`.vit`) and TNT (:mod:`.tnt`) cut the image into patches, add a class token and
learned absolute positions (:class:`AbsolutePositionEmbedding`, resized to any grid), run
``num_layers`` blocks and return chosen blocks' patch tokens as maps. :class:`TokenBackboneMixin`
holds that loop's pieces, stage freezing, train mode and ``init_cfg=dict(type='Pretrained')``
(through :func:`~.token_checkpoint.load_converted_checkpoint`); :func:`resolve_arch` and
:func:`check_heads` read an architecture table (each model keeps its own table, timm's names).

Shapes: patch tokens (B, Hp*Wp, C); with the class token (B, E + Hp*Wp, C), E = 0 or 1;
output maps (B, C, Hp, Wp).
"""
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from ..layers.pos_embed import AbsolutePositionEmbedding
from .token_checkpoint import load_converted_checkpoint

__all__ = ['TokenBackboneMixin', 'check_heads', 'init_linear_and_norm', 'normalize_out_indices',
           'resolve_arch', 'to_2tuple']


def to_2tuple(value, name: str) -> Tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f'{name} must be a positive int or a pair of them, got {value!r}')
    return pair


def normalize_out_indices(out_indices: Sequence[int], num_layers: int) -> Tuple[int, ...]:
    """Block indices (negative counting from the end) -> sorted non-negative indices."""
    if isinstance(out_indices, int):
        out_indices = (out_indices, )
    indices = []
    for index in out_indices:
        if not isinstance(index, int) or not -num_layers <= index < num_layers:
            raise ValueError(f'out_indices={tuple(out_indices)} must hold block indices in '
                             f'[{-num_layers}, {num_layers - 1}] (num_layers={num_layers})')
        indices.append(index % num_layers)
    if not indices:
        raise ValueError('out_indices must not be empty')
    return tuple(sorted(set(indices)))


class TokenBackboneMixin:
    """What ViT and TNT share: argument checks, class token and positions, the loop's outputs,
    stage freezing, train mode, loading converted checkpoints.

    A subclass sets ``embed_dims`` and ``num_layers``, calls :meth:`_init_layout` and
    :meth:`_init_token_embeddings` in its constructor, and defines ``embedding_modules()``
    (everything before the blocks), ``layers``, ``norm`` and ``convert_checkpoint(state)``.
    """

    def _init_layout(self, patch_size: int, pretrain_img_size, out_indices: Sequence[int],
                     frozen_stages: int, with_cls_token: bool) -> None:
        """Check and keep the arguments about patches, outputs, freezing and the class token.

        Needs ``self.num_layers``; sets ``patch_size``, ``out_indices``, ``frozen_stages``,
        ``with_cls_token``, ``num_extra_tokens`` and ``pretrain_grid`` (the position table's).
        """
        num_layers = self.num_layers
        if not isinstance(patch_size, int) or patch_size <= 0:
            raise ValueError(f'patch_size must be a positive int, got {patch_size!r}')
        pretrain_img_size = to_2tuple(pretrain_img_size, 'pretrain_img_size')
        if any(side % patch_size for side in pretrain_img_size):
            raise ValueError(f'patch_size={patch_size} must divide pretrain_img_size='
                             f'{pretrain_img_size}: the position embedding is learnt on that grid')
        if not isinstance(frozen_stages, int) or not -1 <= frozen_stages <= num_layers:
            raise ValueError(f'frozen_stages must be in [-1, {num_layers}] (-1: nothing, 0: '
                             f'the embeddings, k: also blocks 0..k-1), got {frozen_stages!r}')
        self.patch_size = patch_size
        self.out_indices = normalize_out_indices(out_indices, num_layers)
        self.frozen_stages = frozen_stages
        self.with_cls_token = with_cls_token
        self.num_extra_tokens = int(with_cls_token)
        self.pretrain_grid = (pretrain_img_size[0] // patch_size,
                              pretrain_img_size[1] // patch_size)

    def _init_token_embeddings(self, init_cls_token: Callable[[torch.Tensor], None],
                               interpolate_mode: str, drop_rate: float) -> None:
        """The class token (if any, initialised in place by ``init_cls_token``), the position
        table on ``pretrain_grid`` and the dropout after it, in this order."""
        if self.with_cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, self.embed_dims))
            init_cls_token(self.cls_token)
        else:
            self.cls_token = None
        self.pos_embed = AbsolutePositionEmbedding(
            self.embed_dims, self.pretrain_grid, num_extra_tokens=self.num_extra_tokens,
            mode=interpolate_mode)
        self.drop_after_pos = nn.Dropout(drop_rate)

    def _add_token_embeddings(self, tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """Patch tokens (B, Hp*Wp, C) -> class token prepended, positions added, dropout."""
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return self.drop_after_pos(tokens + self.pos_embed(grid))  # (B, E + Hp*Wp, C)

    def _after_block(self, index: int, tokens: torch.Tensor, grid: Tuple[int, int],
                     outs: List[torch.Tensor]) -> torch.Tensor:
        """The final norm after the last block; block ``index``'s map appended to ``outs`` if
        it is an output. Returns the tokens the next block takes."""
        if index == self.num_layers - 1 and self.norm is not None:
            tokens = self.norm(tokens)
        if index in self.out_indices:
            outs.append(self._token_maps(tokens, grid))  # (B, C, Hp, Wp)
        return tokens

    def _frozen_modules(self) -> List[nn.Module]:
        if self.frozen_stages < 0:
            return []
        modules = list(self.embedding_modules()) + list(self.layers[:self.frozen_stages])
        if self.frozen_stages == len(self.layers) and self.norm is not None:
            modules.append(self.norm)
        return modules

    def _freeze_stages(self):
        for module in self._frozen_modules():
            if isinstance(module, nn.Parameter):
                module.requires_grad = False
                continue
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._frozen_modules():
            if isinstance(module, nn.Module):
                module.eval()  # frozen blocks run without dropout / drop-path
        return self

    def _token_maps(self, tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        batch, _, channels = tokens.shape
        patches = tokens[:, self.num_extra_tokens:]  # the class token is not a map position
        return patches.reshape(batch, *grid, channels).permute(0, 3, 1, 2).contiguous()

    def init_weights(self):
        init_cfg = self.init_cfg
        if isinstance(init_cfg, dict) and init_cfg.get('type') == 'Pretrained':
            checkpoint = init_cfg.get('checkpoint')
            if not checkpoint:
                raise ValueError(f"{type(self).__name__}: init_cfg type 'Pretrained' needs "
                                 f'a checkpoint, got {init_cfg}')
            load_converted_checkpoint(self, checkpoint, self.convert_checkpoint)
            self._is_init = True
        else:
            super().init_weights()
        self._freeze_stages()  # parameters loaded into frozen stages stay frozen


def init_linear_and_norm(module: nn.Module):
    """timm's initialisation: truncated-normal(0.02) Linear weights, zero biases, LN = 1/0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def check_heads(arch: dict, dims_name: str, heads_name: str) -> None:
    """``arch[heads_name]`` must be a positive int dividing ``arch[dims_name]``."""
    dims, heads = arch[dims_name], arch[heads_name]
    if not isinstance(heads, int) or heads <= 0 or dims % heads:
        raise ValueError(f'{dims_name}={dims} must be divisible by {heads_name}={heads!r}')


def resolve_arch(arch, archs: Dict[str, dict], name: str) -> dict:
    if isinstance(arch, str):
        if arch.lower() not in archs:
            raise ValueError(f'arch={arch!r} is not a {name} architecture; choose one of '
                             f'{sorted(archs)} or give a dict with {sorted(next(iter(archs.values())))}')
        return dict(archs[arch.lower()])
    required = set(next(iter(archs.values())))
    if not isinstance(arch, dict) or not required <= set(arch):
        raise ValueError(f'a custom {name} arch must be a dict with keys {sorted(required)}, '
                         f'got {arch!r}')
    return {k: arch[k] for k in required}
