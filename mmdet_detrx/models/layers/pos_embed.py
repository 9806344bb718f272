"""Learned absolute position embedding of a patch grid, resized bicubically to any grid.

ViT (Dosovitskiy et al., ICLR 2021, https://arxiv.org/abs/2010.11929) learns one embedding per
patch of the pretraining grid (14x14 for 224 px images and 16 px patches) plus one per extra
token (the class token). Detection inputs give other grids, so the patch part is interpolated
bicubically (as the paper does for fine-tuning at higher resolution) while the extra tokens keep
theirs. At the pretraining grid the stored tensor is used as it is.

Shapes: ``weight`` is ``(1, num_extra_tokens + Hg * Wg, C)``; ``forward((H, W))`` returns
``(1, num_extra_tokens + H * W, C)``.
"""
from collections import OrderedDict
from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['resize_pos_embed', 'AbsolutePositionEmbedding']


def resize_pos_embed(pos_embed: torch.Tensor,
                     src_shape: Sequence[int],
                     dst_shape: Sequence[int],
                     num_extra_tokens: int = 0,
                     mode: str = 'bicubic') -> torch.Tensor:
    """Interpolate the grid part of ``pos_embed`` from ``src_shape`` to ``dst_shape`` (H, W).

    The first ``num_extra_tokens`` entries (class token, ...) are kept unchanged. Returns
    ``pos_embed`` itself when the shapes are equal.
    """
    src_shape, dst_shape = tuple(src_shape), tuple(dst_shape)
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f'pos_embed must be (1, N, C), got {tuple(pos_embed.shape)}')
    num_grid = pos_embed.shape[1] - num_extra_tokens
    if num_grid != src_shape[0] * src_shape[1]:
        raise ValueError(f'pos_embed has {num_grid} grid entries (+{num_extra_tokens} extra), '
                         f'which is not src_shape={src_shape}')
    if src_shape == dst_shape:
        return pos_embed
    extra, grid = pos_embed[:, :num_extra_tokens], pos_embed[:, num_extra_tokens:]
    channels = pos_embed.shape[2]
    grid = grid.reshape(1, *src_shape, channels).permute(0, 3, 1, 2)  # (1, C, Hs, Ws)
    # Interpolate in fp32 whatever the parameter dtype (fp16/bf16 tables lose the fine detail).
    grid = F.interpolate(grid.float(), size=dst_shape, mode=mode,
                         align_corners=False if mode in ('bilinear', 'bicubic') else None)
    grid = grid.to(pos_embed.dtype).flatten(2).transpose(1, 2)  # (1, Hd * Wd, C)
    return torch.cat([extra, grid], dim=1)


class AbsolutePositionEmbedding(nn.Module):
    """A learned position embedding on ``grid_size``, returned for any grid.

    Resized tables are cached per (grid, dtype, device) when no gradient is needed (inference,
    or a frozen embedding), and recomputed after the weight changes (optimizer step,
    ``load_state_dict``). While the weight is trained the table is recomputed every call, so
    gradients reach ``weight``.

    Args:
        embed_dims (int): channels ``C``.
        grid_size (tuple[int, int]): the pretraining grid ``(Hg, Wg)``.
        num_extra_tokens (int): leading entries that are not on the grid (1 for a class token).
        mode (str): interpolation mode of ``F.interpolate``. Default: ``'bicubic'``.
        init_std (float): std of the truncated-normal initialisation. Default: 0.02.
        cache_size (int): most resized tables kept (least recently used dropped). Default: 16.
    """

    def __init__(self,
                 embed_dims: int,
                 grid_size: Tuple[int, int],
                 num_extra_tokens: int = 0,
                 mode: str = 'bicubic',
                 init_std: float = 0.02,
                 cache_size: int = 16):
        super().__init__()
        grid_size = tuple(int(v) for v in grid_size)
        if len(grid_size) != 2 or min(grid_size) <= 0:
            raise ValueError(f'grid_size must be two positive ints, got {grid_size}')
        if mode not in ('bicubic', 'bilinear', 'nearest'):
            raise ValueError(f"mode must be 'bicubic', 'bilinear' or 'nearest', got {mode!r}")
        self.embed_dims = embed_dims
        self.grid_size = grid_size
        self.num_extra_tokens = num_extra_tokens
        self.mode = mode
        self.cache_size = cache_size
        self.weight = nn.Parameter(
            torch.zeros(1, num_extra_tokens + grid_size[0] * grid_size[1], embed_dims))
        nn.init.trunc_normal_(self.weight, std=init_std)
        self._cache = OrderedDict()

    def forward(self, grid_size: Tuple[int, int]) -> torch.Tensor:
        grid_size = tuple(grid_size)
        if grid_size == self.grid_size:
            return self.weight
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return resize_pos_embed(self.weight, self.grid_size, grid_size,
                                    self.num_extra_tokens, self.mode)
        key = (grid_size, self.weight.dtype, self.weight.device)
        # _version counts in-place writes (optimizer steps, load_state_dict); data_ptr changes
        # when .to()/.half() swaps the storage.
        stamp = (self.weight._version, self.weight.data_ptr())
        hit = self._cache.get(key)
        if hit is not None and hit[0] == stamp:
            self._cache.move_to_end(key)
            return hit[1]
        with torch.no_grad():
            table = resize_pos_embed(self.weight, self.grid_size, grid_size,
                                     self.num_extra_tokens, self.mode)
        self._cache[key] = (stamp, table)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return table

    def extra_repr(self) -> str:
        return (f'embed_dims={self.embed_dims}, grid_size={self.grid_size}, '
                f'num_extra_tokens={self.num_extra_tokens}, mode={self.mode!r}')
