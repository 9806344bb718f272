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

Scale-free width (``relative_bucket_width=rho``): an absolute ``r`` only suits queries of one
scale. With ``rho``, each (image, head) uses ``r = rho * spread``, the root mean squared distance
of its real (non-padded) scaled queries to their mean (:func:`query_spread`), and hashes the
projections centred on that mean: the clusters do not change when a model's queries are scaled
or shifted, so one ``rho`` transfers across models. Per-layer values: a list, one entry per
encoder layer (:func:`resolve_act_layers`). To pick a width from data instead of by hand, see
:mod:`~mmdet_detrx.models.layers.act_calibration`.

Differences from the official code, all deliberate: the hash is seeded and fixed (kept in
checkpoints) instead of redrawn every forward; the ``L`` codes are grouped exactly (no lossy
packing into one int64); padded positions are masked out as keys and never join a real cluster;
batches of any size (0 included) give the same per-image result; hash codes cannot overflow
(:class:`E2LSH`).
"""
import contextlib
import math
from collections import OrderedDict
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from mmcv.cnn.bricks.transformer import MultiheadAttention
from mmdet.registry import MODELS
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .attention_inputs import attention_inputs
from .e2lsh import E2LSH, all_finite

__all__ = ['ACTForward', 'ACTResult', 'AdaptiveClusteringAttention', 'Clusters',
           'act_exact_mode', 'adaptive_clustering_attention', 'cluster_queries', 'group_codes',
           'hash_queries', 'query_spread', 'record_act_forwards', 'resolve_act_layers']

_INT64_SAFE = 2**62
_SPREAD_RESOLUTION = 2.0**-20


def group_codes(prefix: Tensor, codes: Tensor) -> Tensor:
    """Dense ids of the distinct rows of ``(prefix, codes)``, in lexicographic order.

    Args:
        prefix (Tensor): (M,) non-negative int64, the most significant key (e.g. image*head).
        codes (Tensor): (M, L) int64 hash codes, any values (the whole int64 range).

    Returns:
        Tensor: (M,) int64 ids in ``[0, T)``, equal iff the rows are equal. Columns are packed
        one at a time into a mixed-radix number whose radix is the column's exact range (or its
        number of distinct values, for a range wider than M), and the running key is
        re-densified with ``torch.unique`` before it could overflow int64, so distinct rows
        never collide.
    """
    num_rows = prefix.numel()
    if num_rows == 0:
        return prefix.clone()
    rounds = codes.t().contiguous()  # (L, M): each hash round contiguous
    lows, highs = (t.tolist() for t in torch.aminmax(rounds, dim=1))
    ids = prefix
    bound = int(prefix.max()) + 1  # ids < bound
    for column, (low, high) in enumerate(zip(lows, highs)):
        if high == low:
            continue  # a constant column separates nothing
        if high - low >= num_rows:  # very narrow buckets: rank the column to bound its radix
            digit = torch.unique(rounds[column], return_inverse=True)[1]
            radix = int(digit.max()) + 1
        else:
            digit = rounds[column] - low  # Python ints above: the range test cannot overflow
            radix = high - low + 1
        if bound * radix >= _INT64_SAFE:  # re-densify before the key could overflow
            ids = torch.unique(ids, return_inverse=True)[1]
            bound = int(ids.max()) + 1
        ids = ids * radix + digit  # mixed radix: lexicographic order is kept
        bound *= radix
    return torch.unique(ids, return_inverse=True)[1]


def query_spread(query: Tensor, query_padding_mask: Optional[Tensor] = None
                 ) -> Tuple[Tensor, Tensor]:
    """Mean and spread of each (image, head)'s queries over its real tokens, in float64.

    Args:
        query (Tensor): (B, heads, N, d).
        query_padding_mask (Tensor, optional): (B, N) bool, True marks padding (excluded).

    Returns:
        tuple: mean (B, heads, 1, d) and spread (B, heads, 1, 1), the root mean squared
        distance of the real queries to their mean, ``sqrt(mean_n ||q_n - mean||^2)``. A random
        projection ``a . q`` (``a ~ N(0, I)``) of the queries has this standard deviation on
        average over ``a``, so a bucket width of ``rho * spread`` cuts every E2LSH round into
        buckets ``rho`` standard deviations wide whatever the scale of the queries. Zero when
        there is no real token or all real queries are equal.
    """
    batch, heads, num_queries, _ = query.shape
    q = query.detach().double()
    if query_padding_mask is None:
        real = torch.ones(batch, 1, num_queries, 1, dtype=torch.bool, device=query.device)
    else:
        real = ~query_padding_mask.view(batch, 1, num_queries, 1)
    count = real.sum(dim=2, keepdim=True).clamp(min=1).double()  # (B, 1, 1, 1)
    q = q.masked_fill(~real, 0.0)
    mean = q.sum(dim=2, keepdim=True) / count  # (B, heads, 1, d)
    centred = (q - mean).masked_fill(~real, 0.0)
    spread = (centred.square().sum(dim=(2, 3), keepdim=True) / count).sqrt()  # (B, heads, 1, 1)
    return mean, spread


def hash_queries(scaled_query: Tensor, lsh: E2LSH,
                 query_padding_mask: Optional[Tensor] = None,
                 bucket_width: Optional[float] = None,
                 relative_bucket_width: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """E2LSH codes of the scaled per-head queries, with an absolute or a scale-free width.

    Args:
        scaled_query (Tensor): (B, heads, N, d), ``q / sqrt(d)``.
        lsh (E2LSH): the hash (projections, offsets, own width).
        query_padding_mask (Tensor, optional): (B, N) bool; padded queries all get code 0
            (they are grouped apart from real tokens by the caller).
        bucket_width (float, optional): absolute ``r``; None for ``lsh.bucket_width``.
        relative_bucket_width (float, optional): scale-free mode: ``r = rho * spread`` per
            (image, head) (:func:`query_spread`) and the projections are centred on the real
            queries' mean, so codes are invariant to scaling and shifting that head's queries.
            A spread below 2**-20 of the queries' RMS norm (equal queries up to rounding) gives
            one cluster.

    Returns:
        tuple: codes (B, heads, N, L) int64, and the absolute widths used (B, heads) float64.
    """
    batch, heads, num_queries, _ = scaled_query.shape
    projected = lsh.project(scaled_query)  # (B, heads, N, L)
    if relative_bucket_width is None:
        width = float(lsh.bucket_width if bucket_width is None else bucket_width)
        widths = torch.full((batch, heads), width, dtype=torch.float64,
                            device=scaled_query.device)
        if query_padding_mask is not None:
            projected = projected.masked_fill(query_padding_mask.view(batch, 1, num_queries, 1),
                                              0.0)
        return lsh.bucket(projected, None if bucket_width is None else width), widths
    mean, spread = query_spread(scaled_query, query_padding_mask)
    centre = mean @ lsh.projections.double().t()  # (B, heads, 1, L)
    projected = projected - centre.to(projected.dtype)  # (B, heads, N, L)
    if query_padding_mask is not None:
        projected = projected.masked_fill(query_padding_mask.view(batch, 1, num_queries, 1), 0.0)
    # A spread below what fp32 projections resolve (2**-20 of the queries' RMS norm) is rounding
    # noise of equal queries: one cluster, with a width far above that noise (the RMS norm).
    magnitude = (spread.square() + mean.square().sum(dim=-1, keepdim=True)).sqrt()
    resolvable = spread > _SPREAD_RESOLUTION * magnitude
    fallback = torch.where(magnitude > 0, magnitude, torch.ones_like(magnitude))
    widths = torch.where(resolvable, relative_bucket_width * spread, fallback)
    if projected.dtype != torch.float64:
        widths = widths.to(projected.dtype).double()  # the width the hash actually uses
    return lsh.bucket(projected, widths), widths.view(batch, heads)


class Clusters(NamedTuple):
    """Which cluster each query of a (B, heads, N) batch joined (:func:`cluster_queries`).

    Attributes:
        ids (Tensor): (B, heads, N) int64 cluster of each query, numbered per (image, head)
            from 0 in code order; -1 for padded queries.
        num_real (Tensor): (B, heads) int64 clusters of real (non-padded) queries.
        max_clusters (int): most clusters of any (image, head) (padded clusters included):
            the prototypes are stored as (B, heads, max_clusters, d).
        slot (Tensor): (B * heads * N,) int64 row of each query's prototype in that store
            flattened, ``(image * heads + head) * max_clusters + cluster``.
    """
    ids: Tensor
    num_real: Tensor
    max_clusters: int
    slot: Tensor


def cluster_queries(codes: Tensor, query_padding_mask: Optional[Tensor] = None) -> Clusters:
    """Group the queries of each (image, head) whose ``L`` hash codes are all equal.

    Args:
        codes (Tensor): (B, heads, N, L) int64, from :func:`hash_queries`.
        query_padding_mask (Tensor, optional): (B, N) bool, True marks padded queries: they
            are clustered among themselves only, so they never change a real prototype.

    Returns:
        Clusters: ids, real-cluster counts and prototype slots.
    """
    batch, heads, num_queries, _ = codes.shape
    device = codes.device
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

    local = local.view(batch, heads, num_queries)
    if query_padding_mask is not None:
        local = local.masked_fill(query_padding_mask.view(batch, 1, num_queries), -1)
        real_clusters = torch.bincount(cluster_group, minlength=2 * batch * heads)[0::2]
    else:
        real_clusters = per_bh
    return Clusters(local, real_clusters.view(batch, heads), max_clusters, slot)


def _cluster_means(query: Tensor, clusters: Clusters) -> Tensor:
    """Prototypes (B, heads, max_clusters, d): mean of member queries, accumulated in fp32 at
    least (an empty slot is zero)."""
    batch, heads, _, head_dims = query.shape
    acc_dtype = torch.promote_types(query.dtype, torch.float32)
    flat_query = query.reshape(-1, head_dims).to(acc_dtype)
    sums = flat_query.new_zeros(batch * heads * clusters.max_clusters, head_dims)
    sums = sums.index_add(0, clusters.slot, flat_query)
    counts = torch.bincount(clusters.slot, minlength=sums.shape[0]).clamp_(min=1)
    prototypes = (sums / counts.unsqueeze(1).to(acc_dtype)).to(query.dtype)
    return prototypes.view(batch, heads, clusters.max_clusters, head_dims)  # (B, heads, C, d)


def _prototype_attention(prototypes: Tensor, key: Tensor, value: Tensor,
                         key_padding_mask: Optional[Tensor], dropout_p: float) -> Tensor:
    """Exact softmax attention of the prototypes (B, heads, C, d) over the real keys.

    Returns (B, heads, C, dv); zero for an image whose keys are all padded.
    """
    batch, num_keys = key.shape[0], key.shape[2]
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
    return out


class ACTResult(NamedTuple):
    """What :func:`adaptive_clustering_attention` returns.

    Attributes:
        output (Tensor): (B, heads, N, head_dims_v); zero for an image whose keys are all
            padded.
        cluster_ids (Tensor): (B, heads, N) int64, numbered per (image, head) from 0, -1 for
            padded queries.
        num_clusters (Tensor): (B, heads) int64 real (non-padded) clusters.
        bucket_widths (Tensor): (B, heads) float64 absolute widths used (NaN without tokens).
    """
    output: Tensor
    cluster_ids: Tensor
    num_clusters: Tensor
    bucket_widths: Tensor


def adaptive_clustering_attention(
        query: Tensor,
        key: Tensor,
        value: Tensor,
        lsh: E2LSH,
        key_padding_mask: Optional[Tensor] = None,
        query_padding_mask: Optional[Tensor] = None,
        dropout_p: float = 0.0,
        bucket_width: Optional[float] = None,
        relative_bucket_width: Optional[float] = None) -> ACTResult:
    """Clustered-query attention on per-head tensors.

    The steps: hash the scaled queries (:func:`hash_queries`), group equal codes into clusters
    (:func:`cluster_queries`), average each cluster's queries into a prototype, let the
    prototypes attend to the keys with an exact softmax, and broadcast each prototype's output
    to its members.

    Args:
        query (Tensor): (B, heads, N, head_dims), not yet scaled.
        key (Tensor): (B, heads, S, head_dims).
        value (Tensor): (B, heads, S, head_dims_v).
        lsh (E2LSH): hash applied to ``query * head_dims ** -0.5``.
        key_padding_mask (Tensor, optional): (B, S) bool, True marks padding.
        query_padding_mask (Tensor, optional): (B, N) bool, True marks padded queries: they are
            clustered among themselves only, so they never change a real token's prototype.
        dropout_p (float): dropout on the prototype attention weights.
        bucket_width (float, optional): absolute width instead of ``lsh.bucket_width``.
        relative_bucket_width (float, optional): scale-free width (see :func:`hash_queries`);
            takes precedence over ``bucket_width``.

    Returns:
        ACTResult: the output, cluster ids, real-cluster counts and widths used.
    """
    batch, heads, num_queries, head_dims = query.shape
    num_keys = key.shape[2]
    device = query.device
    if batch == 0 or num_queries == 0 or num_keys == 0:
        return ACTResult(value.new_zeros(batch, heads, num_queries, value.shape[-1]),
                         torch.full((batch, heads, num_queries), -1, device=device),
                         torch.zeros(batch, heads, dtype=torch.int64, device=device),
                         torch.full((batch, heads), float('nan'), dtype=torch.float64,
                                    device=device))
    if not all_finite(query):
        raise ValueError('query contains non-finite values (inf/nan): the queries cannot be '
                         'hashed into clusters')

    scaled_query = query * head_dims**-0.5
    codes, widths = hash_queries(scaled_query, lsh, query_padding_mask, bucket_width,
                                 relative_bucket_width)  # (B, heads, N, L)
    clusters = cluster_queries(codes, query_padding_mask)
    prototypes = _cluster_means(query, clusters)  # (B, heads, C, d)
    out = _prototype_attention(prototypes, key, value, key_padding_mask, dropout_p)
    # Broadcast: every query takes its prototype's output.
    output = out.reshape(batch * heads * clusters.max_clusters, -1)[clusters.slot]
    output = output.view(batch, heads, num_queries, -1)  # (B, heads, N, dv)
    return ACTResult(output, clusters.ids, clusters.num_real, widths)


_PER_LAYER_ARGS = ('num_hashes', 'bucket_width', 'relative_bucket_width')


class ACTForward(NamedTuple):
    """One forward of an :class:`AdaptiveClusteringAttention`, as its record hooks receive it
    (:meth:`AdaptiveClusteringAttention.register_record_hook`, :func:`record_act_forwards`).

    Attributes:
        num_queries, num_keys (Tensor): (B,) real (non-padded) tokens.
        num_clusters (Tensor | None): (B, heads) real clusters; None for an exact forward.
        cluster_ids (Tensor | None): (B, heads, N) cluster of each query (-1: padding).
        bucket_widths (Tensor | None): (B, heads) float64 absolute widths used.
        num_hashes (int): E2LSH rounds of that forward.

    :func:`mmdet_detrx.utils.complexity.act_flops` turns it into multiply-accumulates.
    """
    num_queries: Tensor
    num_keys: Tensor
    num_clusters: Optional[Tensor]
    cluster_ids: Optional[Tensor]
    bucket_widths: Optional[Tensor]
    num_hashes: int


def _real_tokens(query: Tensor, key: Optional[Tensor], key_padding_mask: Optional[Tensor],
                 batch_first: bool) -> Tuple[Tensor, Tensor]:
    """(B,) real queries and keys of a forward's arguments (a key padding mask of the keys'
    shape counts; in self-attention it marks the queries too)."""
    token_dim = 1 if batch_first else 0
    num_queries = query.shape[token_dim]
    num_keys = num_queries if key is None else key.shape[token_dim]
    batch = query.shape[1 - token_dim]
    queries = torch.full((batch, ), num_queries, device=query.device)
    keys = queries.clone() if num_keys == num_queries else \
        torch.full((batch, ), num_keys, device=query.device)
    if key_padding_mask is not None and key_padding_mask.shape == (batch, num_keys):
        keys = (~key_padding_mask.bool()).sum(dim=1)
        if num_keys == num_queries:
            queries = keys
    return queries, keys


class _HashSetting:
    """An attribute of the attention that lives in its hash: read ``lsh.<name>``, write with
    ``lsh.set_<name>(value)`` (which checks the value and keeps the hash consistent)."""

    def __init__(self, name: str, doc: str) -> None:
        self.name = name
        self.__doc__ = doc

    def __get__(self, module, owner=None):
        return self if module is None else getattr(module.lsh, self.name)

    def __set__(self, module, value) -> None:
        getattr(module.lsh, f'set_{self.name}')(value)


@MODELS.register_module()
class AdaptiveClusteringAttention(MultiheadAttention):
    """ACT encoder self-attention with the parameters of mmcv's ``MultiheadAttention``.

    A state dict of ``MultiheadAttention`` loads strictly (ACT adds no trained parameter; the
    hash buffers are optional in the state dict, see :class:`E2LSH`).

    Args:
        embed_dims, num_heads, attn_drop, proj_drop, dropout_layer, init_cfg, batch_first:
            as mmcv's ``MultiheadAttention``.
        num_hashes (int | list[int]): E2LSH rounds ``L``. Default: 32 (official).
        bucket_width (float | list[float]): E2LSH bucket width ``r`` on ``q / sqrt(head_dims)``,
            absolute. Default: 8.0 (official).
        seed (int): Seed of the hash projections. Default: 0.
        relative_bucket_width (float | list, optional): Scale-free width ``rho``: each
            (image, head) uses ``r = rho * spread`` of its real scaled queries
            (:func:`query_spread`), with projections centred on their mean, so clusters do not
            change when a model's queries are scaled or shifted. None (default): the absolute
            ``bucket_width``. Takes precedence over ``bucket_width`` when set.
        layer_index (int, optional): Index of the encoder layer this attention belongs to; it
            picks the entry of every per-layer list above. Usually left None and set by
            :func:`resolve_act_layers` (or the detector) once the encoder is built.

    A list for ``num_hashes``, ``bucket_width`` or ``relative_bucket_width`` gives one value per
    encoder layer (an entry ``None`` in ``relative_bucket_width`` means "absolute width for this
    layer"); its length must equal the number of layers.

    Attributes:
        use_exact (bool): When True, forward is exactly mmcv's ``MultiheadAttention.forward``
            (full softmax attention with the same weights). Default: False.

    The layer keeps nothing about its forwards: tools that need the clusters, widths or token
    counts register a record hook (:meth:`register_record_hook`, :func:`record_act_forwards`).
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 attn_drop: float = 0.,
                 proj_drop: float = 0.,
                 dropout_layer: Optional[dict] = dict(type='Dropout', drop_prob=0.),
                 init_cfg: Optional[dict] = None,
                 batch_first: bool = False,
                 num_hashes: Union[int, Sequence[int]] = 32,
                 bucket_width: Union[float, Sequence[float]] = 8.0,
                 seed: int = 0,
                 relative_bucket_width: Union[None, float, Sequence[Optional[float]]] = None,
                 layer_index: Optional[int] = None,
                 **kwargs) -> None:
        if not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f'num_heads must be a positive int, got {num_heads!r}')
        if embed_dims % num_heads != 0:
            raise ValueError(f'embed_dims ({embed_dims}) must be divisible by num_heads '
                             f'({num_heads})')
        settings = dict(num_hashes=num_hashes, bucket_width=bucket_width,
                        relative_bucket_width=relative_bucket_width)
        per_layer = {}
        for name, value in settings.items():
            if isinstance(value, (list, tuple)):
                if len(value) == 0:
                    raise ValueError(f'{name} is an empty per-layer list')
                for entry in value:
                    _check_setting(name, entry)
                per_layer[name] = list(value)
            else:
                _check_setting(name, value)
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
        first = {name: values[0] for name, values in per_layer.items()}
        self.lsh = E2LSH(self.head_dims, first.get('num_hashes', num_hashes),
                         first.get('bucket_width', bucket_width), seed)
        self._relative_bucket_width = first.get('relative_bucket_width', relative_bucket_width)
        self.per_layer = per_layer
        self.layer_index: Optional[int] = None
        if layer_index is not None:
            self.select_layer(layer_index)
        self.use_exact = False
        self._record_hooks: Dict[int, Callable] = OrderedDict()

    num_hashes = _HashSetting('num_hashes', 'E2LSH rounds ``L``.')
    bucket_width = _HashSetting('bucket_width', 'Absolute E2LSH bucket width ``r``.')

    @property
    def relative_bucket_width(self) -> Optional[float]:
        return self._relative_bucket_width

    @relative_bucket_width.setter
    def relative_bucket_width(self, value: Optional[float]) -> None:
        _check_setting('relative_bucket_width', value)
        self._relative_bucket_width = None if value is None else float(value)

    def select_layer(self, index: int, num_layers: Optional[int] = None) -> None:
        """Take entry ``index`` of every per-layer list (checked to have ``num_layers``)."""
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f'layer_index must be an int >= 0, got {index!r}')
        for name, values in self.per_layer.items():  # check all before changing any
            if num_layers is not None and len(values) != num_layers:
                raise ValueError(f'{name} has {len(values)} per-layer values {values} but the '
                                 f'encoder has {num_layers} layers')
            if index >= len(values):
                raise ValueError(f'layer_index {index} is out of range for the {len(values)} '
                                 f'per-layer values of {name} {values}')
        if 'bucket_width' in self.per_layer:
            self.lsh._offsets_for(self.per_layer['bucket_width'][index])
        for name, values in self.per_layer.items():
            setattr(self, name, values[index])
        self.layer_index = index

    def register_record_hook(
            self, hook: Callable[['AdaptiveClusteringAttention', ACTForward], None]
    ) -> RemovableHandle:
        """Call ``hook(layer, record)`` after every forward with its :class:`ACTForward`
        (exact forwards included); ``handle.remove()`` unregisters it. Nothing is computed for
        the record while no hook is registered."""
        handle = RemovableHandle(self._record_hooks)
        self._record_hooks[handle.id] = hook
        return handle

    def _call_record_hooks(self, query: Tensor, key: Optional[Tensor],
                           key_padding_mask: Optional[Tensor],
                           result: Optional[ACTResult]) -> None:
        num_queries, num_keys = _real_tokens(query, key, key_padding_mask, self.batch_first)
        if result is None:  # exact attention
            record = ACTForward(num_queries, num_keys, None, None, None, self.num_hashes)
        else:
            record = ACTForward(num_queries, num_keys, result.num_clusters, result.cluster_ids,
                                result.bucket_widths, self.num_hashes)
        for hook in tuple(self._record_hooks.values()):
            hook(self, record)

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
        if self.use_exact:
            if self._record_hooks:
                self._call_record_hooks(query, key, key_padding_mask, None)
            return super().forward(query, key, value, identity, query_pos, key_pos, attn_mask,
                                   key_padding_mask, **kwargs)
        if self.per_layer and self.layer_index is None:
            raise RuntimeError(
                f'{sorted(self.per_layer)} hold per-layer lists but this attention does not know '
                'its layer: call mmdet_detrx.models.layers.resolve_act_layers(model) after '
                'building the model (or pass layer_index=)')
        if attn_mask is not None:
            raise ValueError('attn_mask is not supported by AdaptiveClusteringAttention; use '
                             'key_padding_mask, or use_exact=True for full attention')
        identity = query if identity is None else identity
        given_key, given_padding_mask = key, key_padding_mask
        q, k, v, key_padding_mask, query_padding_mask = self.project_heads(
            query, key, value, query_pos, key_pos, key_padding_mask)
        batch, _, num_queries, _ = q.shape

        result = adaptive_clustering_attention(
            q, k, v, self.lsh, key_padding_mask=key_padding_mask,
            query_padding_mask=query_padding_mask,
            dropout_p=self.attn.dropout if self.training else 0.0,
            relative_bucket_width=self.relative_bucket_width)
        if self._record_hooks:
            self._call_record_hooks(query, given_key, given_padding_mask, result)

        out = result.output.transpose(1, 2).reshape(batch, num_queries, self.embed_dims)  # (B, N, C)
        out = self.attn.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return identity + self.dropout_layer(self.proj_drop(out))

    def project_heads(self, query: Tensor, key: Optional[Tensor], value: Optional[Tensor],
                      query_pos: Optional[Tensor], key_pos: Optional[Tensor],
                      key_padding_mask: Optional[Tensor]) -> Tuple[Tensor, ...]:
        """Per-head ``q, k, v`` (B, heads, N|S, head_dims) as forward computes them.

        Omitted arguments take mmcv's defaults (:func:`attention_inputs`). Returns
        ``(q, k, v, key_padding_mask, query_padding_mask)`` with the masks checked and boolean
        (the query mask is the key mask in self-attention, else None).
        """
        query, key, value, _ = attention_inputs(query, key, value, None, query_pos, key_pos,
                                                self.batch_first)  # (B, N|S, C)
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
        return q, k, v, key_padding_mask, query_padding_mask

    def extra_repr(self) -> str:
        width = (f'relative_bucket_width={self.relative_bucket_width}'
                 if self.relative_bucket_width is not None else
                 f'bucket_width={self.bucket_width}')
        return (f'num_hashes={self.num_hashes}, {width}, layer_index={self.layer_index}, '
                f'use_exact={self.use_exact}')


def _check_setting(name: str, value) -> None:
    if name == 'num_hashes':
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f'num_hashes must be an int >= 1, got {value!r}')
        return
    if value is None and name == 'relative_bucket_width':
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or not value > 0:
        raise ValueError(f'{name} must be a finite number > 0, got {value!r}')


def resolve_act_layers(model: nn.Module) -> List[AdaptiveClusteringAttention]:
    """Tell every ACT attention of ``model`` its layer index, applying per-layer settings.

    Walks every ``layers`` ``ModuleList`` (the encoder's, as mmdet's transformer encoders name
    it) and calls :meth:`AdaptiveClusteringAttention.select_layer` with the layer's position
    and the number of layers (a per-layer list of another length is an error naming it).
    Idempotent. Returns the ACT attentions found, in layer order.
    """
    found = []
    for module in model.modules():
        layers = getattr(module, 'layers', None)
        if not isinstance(layers, nn.ModuleList):
            continue
        for index, layer in enumerate(layers):
            for child in layer.children():
                if isinstance(child, AdaptiveClusteringAttention):
                    child.select_layer(index, len(layers))
                    found.append(child)
    return found


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


@contextlib.contextmanager
def record_act_forwards(model: nn.Module) -> Iterator[Dict[str, List[ACTForward]]]:
    """Collect the :class:`ACTForward` of every ACT attention forward in ``model``.

    Yields ``{module name: [record per forward, in call order]}`` for every
    :class:`AdaptiveClusteringAttention` (named as ``model.named_modules()`` names it); the
    hooks are removed on exit, also after an exception.
    """
    records: Dict[str, List[ACTForward]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, AdaptiveClusteringAttention):
            records[name] = []
            handles.append(module.register_record_hook(
                lambda _, record, into=records[name]: into.append(record)))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()
