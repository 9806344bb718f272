"""Adaptive Clustering Attention (ACT), a drop-in for mmcv's ``MultiheadAttention``.

Zheng, Gao et al., "End-to-End Object Detection with Adaptive Clustering Transformer", BMVC 2021.
For each image and head, the projected queries are hashed with ``L`` rounds of E2LSH
(:class:`~mmdet_detrx.models.layers.E2LSH`); queries sharing all ``L`` codes form a cluster. Each
cluster's prototype (the mean of its queries) attends to all non-padded keys with an exact softmax,
and its output is broadcast back to the members. Cost and memory are O(N * C) with ``C`` clusters
chosen by the data, never an N x N matrix.

Shapes (``batch_first=True``): query (B, N, embed_dims) -> output (B, N, embed_dims); inside,
per-head tensors are (B, heads, N, head_dims) and the prototypes (B, heads, C_max, head_dims).

What is hashed, and the scale of ``bucket_width``: the official release hashes the per-head
queries after the in-projection *and* the ``head_dims ** -0.5`` scaling (its attention layer is a
modified copy of ``torch.nn.functional.multi_head_attention_forward``, which scales q before the
attention call), with ``r = 8`` and ``L = 32`` (its ``q_hashes`` argument is ignored: 32 rounds
always). We do the same, so ``bucket_width`` is measured in units of ``q / sqrt(head_dims)``.

Differences from the official code, all deliberate: the hash is seeded and fixed (kept in
checkpoints) instead of redrawn every forward; the ``L`` codes are grouped exactly (no lossy
packing into one int64); padded positions are masked out as keys and never join a real cluster;
batches of any size give the same per-image result.
"""
import contextlib
import math
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from mmcv.cnn.bricks.transformer import MultiheadAttention
from mmdet.registry import MODELS
from torch import Tensor, nn

from .e2lsh import E2LSH

__all__ = ['AdaptiveClusteringAttention', 'act_exact_mode', 'adaptive_clustering_attention',
           'group_codes']

_INT64_SAFE = 2**62


def group_codes(prefix: Tensor, codes: Tensor) -> Tensor:
    """Dense ids of the distinct rows of ``(prefix, codes)``, in lexicographic order.

    Args:
        prefix (Tensor): (M,) non-negative int64, the most significant key (e.g. image*head).
        codes (Tensor): (M, L) int64 hash codes.

    Returns:
        Tensor: (M,) int64 ids in ``[0, T)``, equal iff the rows are equal. Columns are packed
        into a mixed-radix number whose radix is each column's exact range, a chunk of columns
        at a time, and the running key is re-densified with ``torch.unique`` before it could
        overflow int64, so distinct rows never collide.
    """
    num_rows = prefix.numel()
    if num_rows == 0:
        return prefix.clone()
    codes = codes - codes.min(dim=0).values  # (M, L), non-negative
    radices = (codes.max(dim=0).values + 1).tolist()
    for column, radix in enumerate(radices):
        if radix > num_rows:  # very narrow buckets: rank the column first to bound its radix
            codes[:, column] = torch.unique(codes[:, column], return_inverse=True)[1]
            radices[column] = int(codes[:, column].max()) + 1

    def pack(ids, columns, chunk_radices):
        weights, weight = [], 1
        for radix in reversed(chunk_radices):
            weights.append(weight)
            weight *= radix
        weights = torch.tensor(weights[::-1], dtype=torch.int64, device=codes.device)
        digits = codes[:, torch.tensor(columns, device=codes.device)]  # (M, len(columns))
        return ids * weight + (digits * weights).sum(dim=1)

    ids = prefix
    bound = int(prefix.max()) + 1
    columns, chunk_radices = [], []
    for column, radix in enumerate(radices):
        if radix == 1:
            continue  # a constant column separates nothing
        if bound * math.prod(chunk_radices) * radix >= _INT64_SAFE:
            ids = torch.unique(pack(ids, columns, chunk_radices), return_inverse=True)[1]
            bound = int(ids.max()) + 1
            columns, chunk_radices = [], []
        columns.append(column)
        chunk_radices.append(radix)
    if columns:
        ids = pack(ids, columns, chunk_radices)
    return torch.unique(ids, return_inverse=True)[1]


def adaptive_clustering_attention(
        query: Tensor,
        key: Tensor,
        value: Tensor,
        lsh: E2LSH,
        key_padding_mask: Optional[Tensor] = None,
        query_padding_mask: Optional[Tensor] = None,
        dropout_p: float = 0.0) -> Tuple[Tensor, Tensor, Tensor]:
    """Clustered-query attention on per-head tensors.

    Args:
        query (Tensor): (B, heads, N, head_dims), not yet scaled.
        key (Tensor): (B, heads, S, head_dims).
        value (Tensor): (B, heads, S, head_dims_v).
        lsh (E2LSH): hash applied to ``query * head_dims ** -0.5``.
        key_padding_mask (Tensor, optional): (B, S) bool, True marks padding.
        query_padding_mask (Tensor, optional): (B, N) bool, True marks padded queries: they are
            clustered among themselves only, so they never change a real token's prototype.
        dropout_p (float): dropout on the prototype attention weights.

    Returns:
        tuple: output (B, heads, N, head_dims_v); cluster ids (B, heads, N) int64, numbered per
        (image, head) from 0, -1 for padded queries; number of real clusters (B, heads) int64.
        Images whose keys are all padded get a zero output.
    """
    batch, heads, num_queries, head_dims = query.shape
    num_keys = key.shape[2]
    device = query.device
    if num_queries == 0 or num_keys == 0:
        output = value.new_zeros(batch, heads, num_queries, value.shape[-1])
        return (output, torch.full((batch, heads, num_queries), -1, device=device),
                torch.zeros(batch, heads, dtype=torch.int64, device=device))
    if not bool(torch.isfinite(query).all()):
        raise ValueError('query contains non-finite values (inf/nan): the queries cannot be '
                         'hashed into clusters')

    scale = head_dims**-0.5
    codes = lsh(query * scale)  # (B, heads, N, L)
    group = torch.arange(batch * heads, device=device).view(batch, heads, 1)
    group = group.expand(batch, heads, num_queries)  # (B, heads, N)
    if query_padding_mask is not None:
        is_pad = query_padding_mask.view(batch, 1, num_queries).expand_as(group).to(torch.int64)
        group = group * 2 + is_pad  # padded queries get their own clusters
    cluster = group_codes(group.reshape(-1), codes.reshape(batch * heads * num_queries, -1))

    # Clusters are numbered in (image, head, [pad,] codes) order: renumber them per (image, head).
    num_total = int(cluster.max()) + 1
    cluster_group = torch.empty(num_total, dtype=torch.int64, device=device)
    cluster_group.scatter_(0, cluster, group.reshape(-1))
    cluster_bh = cluster_group // 2 if query_padding_mask is not None else cluster_group
    per_bh = torch.bincount(cluster_bh, minlength=batch * heads)  # (B*heads,)
    first = torch.cumsum(per_bh, 0) - per_bh
    token_bh = torch.arange(batch * heads, device=device).repeat_interleave(num_queries)
    local = cluster - first[token_bh]  # (B*heads*N,)
    max_clusters = int(per_bh.max())
    slot = token_bh * max_clusters + local  # row of each token's prototype

    # Prototypes: mean of member queries, accumulated in fp32 at least.
    acc_dtype = torch.promote_types(query.dtype, torch.float32)
    flat_query = query.reshape(-1, head_dims).to(acc_dtype)
    sums = flat_query.new_zeros(batch * heads * max_clusters, head_dims)
    sums = sums.index_add(0, slot, flat_query)
    counts = torch.bincount(slot, minlength=sums.shape[0]).clamp_(min=1)
    prototypes = (sums / counts.unsqueeze(1).to(acc_dtype)).to(query.dtype)
    prototypes = prototypes.view(batch, heads, max_clusters, head_dims)  # (B, heads, C, d)

    attn_mask = None
    empty = None
    if key_padding_mask is not None:
        keep = ~key_padding_mask  # (B, S)
        empty = ~keep.any(dim=1)  # (B,) images with no real key
        keep = keep | empty.unsqueeze(1)  # keep the softmax finite; zeroed below
        attn_mask = keep.view(batch, 1, 1, num_keys)
    out = F.scaled_dot_product_attention(
        prototypes, key, value, attn_mask=attn_mask, dropout_p=dropout_p)  # (B, heads, C, dv)
    if empty is not None:
        out = out.masked_fill(empty.view(batch, 1, 1, 1), 0.0)

    output = out.reshape(batch * heads * max_clusters, -1)[slot]  # broadcast to members
    output = output.view(batch, heads, num_queries, -1)  # (B, heads, N, dv)

    local = local.view(batch, heads, num_queries)
    if query_padding_mask is not None:
        local = local.masked_fill(query_padding_mask.view(batch, 1, num_queries), -1)
        real_clusters = torch.bincount(cluster_group, minlength=2 * batch * heads)[0::2]
    else:
        real_clusters = per_bh
    return output, local, real_clusters.view(batch, heads)


@MODELS.register_module()
class AdaptiveClusteringAttention(MultiheadAttention):
    """ACT encoder self-attention with the parameters of mmcv's ``MultiheadAttention``.

    A state dict of ``MultiheadAttention`` loads strictly (ACT adds no trained parameter; the
    hash buffers are optional in the state dict, see :class:`E2LSH`).

    Args:
        embed_dims, num_heads, attn_drop, proj_drop, dropout_layer, init_cfg, batch_first:
            as mmcv's ``MultiheadAttention``.
        num_hashes (int): E2LSH rounds ``L``. Default: 32 (official).
        bucket_width (float): E2LSH bucket width ``r`` on ``q / sqrt(head_dims)``. Default: 8.0
            (official).
        seed (int): Seed of the hash projections. Default: 0.
        record_clusters (bool): Keep the last forward's cluster ids in ``last_cluster_ids``
            (B, heads, N) for visualisation. Default: False.

    Attributes:
        use_exact (bool): When True, forward is exactly mmcv's ``MultiheadAttention.forward``
            (full softmax attention with the same weights). Default: False.
        last_num_clusters (Tensor | None): (B, heads) real clusters of the last ACT forward
            (None after an exact forward).
        last_num_queries, last_num_keys (Tensor | None): (B,) real tokens of the last forward;
            :meth:`last_flops` turns them into a cost.
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 attn_drop: float = 0.,
                 proj_drop: float = 0.,
                 dropout_layer: Optional[dict] = dict(type='Dropout', drop_prob=0.),
                 init_cfg: Optional[dict] = None,
                 batch_first: bool = False,
                 num_hashes: int = 32,
                 bucket_width: float = 8.0,
                 seed: int = 0,
                 record_clusters: bool = False,
                 **kwargs) -> None:
        if not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f'num_heads must be a positive int, got {num_heads!r}')
        if embed_dims % num_heads != 0:
            raise ValueError(f'embed_dims ({embed_dims}) must be divisible by num_heads '
                             f'({num_heads})')
        if not isinstance(num_hashes, int) or num_hashes < 1:
            raise ValueError(f'num_hashes must be an int >= 1, got {num_hashes!r}')
        if not bucket_width > 0:
            raise ValueError(f'bucket_width must be > 0, got {bucket_width!r}')
        if dropout_layer is not None:
            dropout_layer = dict(dropout_layer)  # mmcv edits it in place for `dropout=`
        super().__init__(embed_dims, num_heads, attn_drop=attn_drop, proj_drop=proj_drop,
                         dropout_layer=dropout_layer, init_cfg=init_cfg,
                         batch_first=batch_first, **kwargs)
        if (not self.attn._qkv_same_embed_dim or self.attn.bias_k is not None
                or self.attn.add_zero_attn):
            raise ValueError('AdaptiveClusteringAttention supports neither kdim/vdim, '
                             'add_bias_kv nor add_zero_attn')
        self.head_dims = embed_dims // num_heads
        self.lsh = E2LSH(self.head_dims, num_hashes, bucket_width, seed)
        self.use_exact = False
        self.record_clusters = record_clusters
        self.last_num_clusters: Optional[Tensor] = None
        self.last_cluster_ids: Optional[Tensor] = None
        self.last_num_queries: Optional[Tensor] = None
        self.last_num_keys: Optional[Tensor] = None

    @property
    def num_hashes(self) -> int:
        return self.lsh.num_hashes

    @property
    def bucket_width(self) -> float:
        return self.lsh.bucket_width

    def forward(self,
                query: Tensor,
                key: Optional[Tensor] = None,
                value: Optional[Tensor] = None,
                identity: Optional[Tensor] = None,
                query_pos: Optional[Tensor] = None,
                key_pos: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None,
                **kwargs) -> Tensor:
        """Same arguments and result as mmcv's ``MultiheadAttention.forward``.

        ``attn_mask`` is not supported by clustering and must be None. In self-attention
        (as many queries as keys) ``key_padding_mask`` marks the padded queries too.
        """
        self._record_sizes(query, key, key_padding_mask)
        if self.use_exact:
            self.last_num_clusters = None
            self.last_cluster_ids = None
            return super().forward(query, key, value, identity, query_pos, key_pos, attn_mask,
                                   key_padding_mask, **kwargs)
        if attn_mask is not None:
            raise ValueError('attn_mask is not supported by AdaptiveClusteringAttention; use '
                             'key_padding_mask, or use_exact=True for full attention')
        if key is None:
            key = query
        if value is None:
            value = key
        if identity is None:
            identity = query
        if key_pos is None and query_pos is not None and query_pos.shape == key.shape:
            key_pos = query_pos
        if query_pos is not None:
            query = query + query_pos
        if key_pos is not None:
            key = key + key_pos
        if not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))

        batch, num_queries, _ = query.shape
        num_keys = key.shape[1]
        if key_padding_mask is not None:
            if key_padding_mask.dtype.is_floating_point:
                raise TypeError('key_padding_mask must be a bool mask (True = padding), got '
                                f'{key_padding_mask.dtype}')
            if tuple(key_padding_mask.shape) != (batch, num_keys):
                raise ValueError(f'key_padding_mask must have shape {(batch, num_keys)}, got '
                                 f'{tuple(key_padding_mask.shape)}')
            key_padding_mask = key_padding_mask.bool()
        query_padding_mask = key_padding_mask if num_queries == num_keys else None

        w_q, w_k, w_v = self.attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = (self.attn.in_proj_bias.chunk(3)
                         if self.attn.in_proj_bias is not None else (None, None, None))
        q = F.linear(query, w_q, b_q).view(batch, num_queries, self.num_heads, self.head_dims)
        k = F.linear(key, w_k, b_k).view(batch, num_keys, self.num_heads, self.head_dims)
        v = F.linear(value, w_v, b_v).view(batch, num_keys, self.num_heads, self.head_dims)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, heads, N, head_dims)

        out, cluster_ids, num_clusters = adaptive_clustering_attention(
            q, k, v, self.lsh, key_padding_mask=key_padding_mask,
            query_padding_mask=query_padding_mask,
            dropout_p=self.attn.dropout if self.training else 0.0)
        self.last_num_clusters = num_clusters
        self.last_cluster_ids = cluster_ids if self.record_clusters else None

        out = out.transpose(1, 2).reshape(batch, num_queries, self.embed_dims)  # (B, N, C)
        out = self.attn.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return identity + self.dropout_layer(self.proj_drop(out))

    def _record_sizes(self, query: Tensor, key: Optional[Tensor],
                      key_padding_mask: Optional[Tensor]) -> None:
        token_dim = 1 if self.batch_first else 0
        num_queries = query.shape[token_dim]
        num_keys = num_queries if key is None else key.shape[token_dim]
        batch = query.shape[1 - token_dim]
        self.last_num_queries = torch.full((batch, ), num_queries, device=query.device)
        self.last_num_keys = self.last_num_queries.clone() if num_keys == num_queries else \
            torch.full((batch, ), num_keys, device=query.device)
        if key_padding_mask is not None and key_padding_mask.shape == (batch, num_keys):
            self.last_num_keys = (~key_padding_mask.bool()).sum(dim=1)
            if num_keys == num_queries:
                self.last_num_queries = self.last_num_keys

    def last_flops(self) -> Tensor:
        """Multiply-accumulates of the last forward, per image (B,), counting real tokens only.

        Both modes: ``4 N E^2`` for the q/k/v/out projections. Exact attention: ``2 N S E``
        (q.k and attention.v over all pairs, the N^2 terms). ACT: ``N L E`` (hashing, L rounds
        per head), ``N E`` (prototype means) and ``2 S d sum_h C_h`` (each head's C_h
        prototypes against the S keys).
        """
        if self.last_num_queries is None:
            raise RuntimeError('last_flops() needs a forward first')
        n = self.last_num_queries.double()
        s = self.last_num_keys.double()
        e = float(self.embed_dims)
        flops = 4 * n * e * e
        if self.last_num_clusters is None:  # exact attention
            return flops + 2 * n * s * e
        clusters = self.last_num_clusters.double().sum(dim=1)  # (B,) summed over heads
        return flops + n * self.num_hashes * e + n * e + 2 * s * self.head_dims * clusters

    def extra_repr(self) -> str:
        return f'use_exact={self.use_exact}, record_clusters={self.record_clusters}'


@contextlib.contextmanager
def act_exact_mode(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Set ``use_exact`` on every :class:`AdaptiveClusteringAttention` in ``model``.

    The previous values are restored on exit, also after an exception.
    """
    modules = [m for m in model.modules() if isinstance(m, AdaptiveClusteringAttention)]
    previous = [m.use_exact for m in modules]
    for module in modules:
        module.use_exact = bool(enabled)
    try:
        yield model
    finally:
        for module, value in zip(modules, previous):
            module.use_exact = value

