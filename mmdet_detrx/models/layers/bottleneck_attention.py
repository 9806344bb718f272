"""All-to-all multi-head self-attention over a feature map, as in BoTNet.

Srinivas et al., "Bottleneck Transformers for Visual Recognition", CVPR 2021
(https://arxiv.org/abs/2101.11605), Fig. 4: queries, keys and values are 1x1 convolutions of
the map, the logits are ``q kᵀ + q rᵀ`` where ``r`` is a position embedding built from
separate height and width tables, and there is no output projection.

Shapes: input and output ``(B, C, H, W)`` with ``C = embed_dims``; internally
``N = H * W`` tokens per image and ``num_heads`` heads of ``C // num_heads`` channels.

Any ``H x W`` works (detection batches change size every step), unlike peers that fix the
feature size at construction:

* ``pos_embed='relative'``: one table per axis holding offsets ``-(max_size - 1)`` ..
  ``max_size - 1``. The embedding for the key at offset ``(dy, dx)`` from a query is
  ``pos_h[dy] + pos_w[dx]``; offsets are gathered directly for the actual ``H x W`` (no
  interpolation). Offsets beyond ``max_size - 1`` are clipped to the outermost embedding, the
  clipping of Shaw et al. 2018, so feature maps larger than ``max_size`` still work.
* ``pos_embed='absolute'``: tables of ``max_size`` rows per axis indexed by the key's
  row/column; rows/columns past ``max_size - 1`` reuse the last embedding.

The position logits are computed for the actual size and passed to
``F.scaled_dot_product_attention`` as an additive bias. Queries are processed in chunks of whole
feature-map rows (``query_chunk_size`` tokens at most, at least one row): each chunk's bias and
attention weights are ``(B, heads, chunk, N)`` instead of ``(B, heads, N, N)``, so the quadratic
buffers stay bounded (BoT50's first c5 block attends over 64x64 = 4096 tokens for a 1024x1024
image: 256 MiB per unchunked fp32 buffer, 64 MiB per 1024-query chunk). Every query's
attention is computed exactly as without chunking.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_

from mmdet.registry import MODELS

__all__ = ['BottleneckAttention', 'relative_position_index']

POS_EMBED_TYPES = ('relative', 'absolute', 'none')


def relative_position_index(size: int, max_size: int, device=None) -> torch.Tensor:
    """Row index into a relative table of ``2 * max_size - 1`` offsets.

    Returns ``(size, size)`` where entry ``[i, j]`` is the table row of offset ``j - i``
    (key minus query), clipped to ``[-(max_size - 1), max_size - 1]``.
    """
    positions = torch.arange(size, device=device)
    offsets = positions[None, :] - positions[:, None]  # (size, size), key - query
    return offsets.clamp(-(max_size - 1), max_size - 1) + (max_size - 1)


@MODELS.register_module()
class BottleneckAttention(BaseModule):
    """Multi-head self-attention of a BoTNet block (the block's ``conv2`` replacement).

    Args:
        embed_dims (int): channels of the input and output map.
        num_heads (int): attention heads; must divide ``embed_dims``. Default: 4 (paper).
        pos_embed (str): ``'relative'`` (paper), ``'absolute'`` or ``'none'``.
        max_size (int): feature-map side covered exactly by the position tables (see module
            docstring for larger maps). Default: 64, i.e. 2048 px at stride 32.
        qkv_bias (bool): bias in the q/k/v projection. Default: False (paper).
        query_chunk_size (int, optional): most queries attended at once (rounded down to whole
            feature-map rows, at least one row); bounds the ``(B, heads, chunk, N)`` buffers.
            ``None``: all ``N`` at once. Default: 1024. Holds no parameters, so checkpoints
            load whatever its value.
        init_cfg (dict, optional): mmengine init config.
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int = 4,
                 pos_embed: str = 'relative',
                 max_size: int = 64,
                 qkv_bias: bool = False,
                 query_chunk_size: Optional[int] = 1024,
                 init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        if not isinstance(embed_dims, int) or embed_dims <= 0:
            raise ValueError(f'embed_dims must be a positive int, got {embed_dims!r}')
        if not isinstance(num_heads, int) or num_heads <= 0 or embed_dims % num_heads:
            raise ValueError(f'num_heads={num_heads!r} must be a positive int dividing '
                             f'embed_dims={embed_dims}')
        if pos_embed not in POS_EMBED_TYPES:
            raise ValueError(f'pos_embed must be one of {POS_EMBED_TYPES}, got {pos_embed!r}')
        if not isinstance(max_size, int) or max_size <= 0:
            raise ValueError(f'max_size must be a positive int, got {max_size!r}')
        if query_chunk_size is not None and (not isinstance(query_chunk_size, int)
                                             or query_chunk_size <= 0):
            raise ValueError(f'query_chunk_size must be a positive int or None, '
                             f'got {query_chunk_size!r}')
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.head_dims = embed_dims // num_heads
        self.scale = self.head_dims**-0.5
        self.pos_embed = pos_embed
        self.max_size = max_size
        self.query_chunk_size = query_chunk_size

        self.qkv = nn.Conv2d(embed_dims, 3 * embed_dims, kernel_size=1, bias=qkv_bias)
        # Shared by all heads, as in the paper and its reference code.
        table_rows = {'relative': 2 * max_size - 1, 'absolute': max_size}.get(pos_embed)
        if table_rows is not None:
            self.pos_h = nn.Parameter(torch.zeros(table_rows, self.head_dims))
            self.pos_w = nn.Parameter(torch.zeros(table_rows, self.head_dims))

    def init_weights(self):
        super().init_weights()
        if self.init_cfg is not None:
            return
        trunc_normal_(self.qkv.weight, std=self.embed_dims**-0.5)
        if self.qkv.bias is not None:
            nn.init.zeros_(self.qkv.bias)
        if self.pos_embed != 'none':
            trunc_normal_(self.pos_h, std=self.scale)
            trunc_normal_(self.pos_w, std=self.scale)

    def _axis_table(self, table: torch.Tensor, size: int) -> torch.Tensor:
        """Embedding of every (query, key) pair along one axis: ``(size, size, head_dims)``."""
        if self.pos_embed == 'relative':
            return table[relative_position_index(size, self.max_size, table.device)]
        key_rows = torch.arange(size, device=table.device).clamp(max=self.max_size - 1)
        return table[key_rows].expand(size, size, -1)  # same embedding for every query

    def position_logits(self, q: torch.Tensor, height: int, width: int,
                        row_start: int = 0) -> torch.Tensor:
        """``q rᵀ`` for queries ``q`` of shape ``(B, heads, R*W, head_dims)``: the queries of
        feature-map rows ``row_start .. row_start + R - 1`` (default: all ``H`` rows).

        Returns the additive attention bias ``(B, heads, R*W, H*W)``.
        """
        batch = q.shape[0]
        rows = q.shape[2] // width
        q = q.reshape(batch, self.num_heads, rows, width, self.head_dims)  # (B, n, R, W, C)
        table_h = self._axis_table(self.pos_h, height)[row_start:row_start + rows]  # (R, H', C)
        table_h = table_h.to(q.dtype)
        table_w = self._axis_table(self.pos_w, width).to(q.dtype)  # (W, W', C)
        logits_h = torch.einsum('bnyxc,yvc->bnyxv', q, table_h)  # (B, n, R, W, H')
        logits_w = torch.einsum('bnyxc,xuc->bnyxu', q, table_w)  # (B, n, R, W, W')
        logits = logits_h[..., :, None] + logits_w[..., None, :]  # (B, n, R, W, H', W')
        return logits.reshape(batch, self.num_heads, rows * width,
                              height * width)  # (B, n, R*W, N')

    def rows_per_chunk(self, height: int, width: int) -> int:
        """Feature-map rows of queries attended at once (see ``query_chunk_size``)."""
        if self.query_chunk_size is None:
            return height
        return min(height, max(1, self.query_chunk_size // width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        if x.dim() != 4 or x.shape[1] != self.embed_dims:
            raise ValueError(f'x must be (B, {self.embed_dims}, H, W), got {tuple(x.shape)}')
        batch, _, height, width = x.shape
        qkv = self.qkv(x).reshape(batch, 3, self.num_heads, self.head_dims, height * width)
        qkv = qkv.transpose(-1, -2)  # (B, 3, n, N, C)
        q, k, v = qkv.unbind(1)  # each (B, n, N, C)

        step = self.rows_per_chunk(height, width)
        chunks = []
        for row_start in range(0, height, step):
            q_rows = q[:, :, row_start * width:(row_start + step) * width]  # (B, n, R*W, C)
            bias = None
            if self.pos_embed != 'none':
                # SDPA scales only q kᵀ; scaling q here gives scale * (q kᵀ + q rᵀ) overall.
                bias = self.position_logits(q_rows * self.scale, height, width,
                                            row_start)  # (B, n, R*W, N)
            chunks.append(F.scaled_dot_product_attention(
                q_rows, k, v, attn_mask=bias, scale=self.scale))  # (B, n, R*W, C)
        out = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=2)  # (B, n, N, C)
        out = out.transpose(-1, -2).reshape(batch, self.embed_dims, height, width)
        return out

    def extra_repr(self) -> str:
        return (f'embed_dims={self.embed_dims}, num_heads={self.num_heads}, '
                f'pos_embed={self.pos_embed!r}, max_size={self.max_size}, '
                f'query_chunk_size={self.query_chunk_size}')
