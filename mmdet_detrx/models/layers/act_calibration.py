"""Calibrate ACT's bucket width on a layer's real inputs instead of choosing it by hand.

The official ``r = 8`` (Zheng, Gao et al., BMVC 2021) is in units of the scaled queries of the
paper's DETR-R50; on a model whose queries have another scale it is wrong (one cluster, or one
per token). Calibration measures, for one :class:`AdaptiveClusteringAttention` with its own
weights and number of hash rounds, the relative error of its output against its exact attention

    err(r) = || out_proj(act_r) - out_proj(exact) || / || out_proj(exact) ||

over the real (non-padded) tokens of the given inputs (the residual is left out: it is the same
in both), and returns the coarsest width meeting a target.

Search: widths ``w_k = s * 2**k`` (``s`` the median query spread, :func:`query_spread`, for an
absolute width; ``s = 1`` for a relative one) are scanned from coarse (every head one cluster) to
fine (every real query its own cluster, the exact limit); the first ``w_k`` meeting the target
and its coarser neighbour bracket the answer, which ``refine_steps`` bisections in log-space
narrow down. The error is not exactly monotone in ``r`` (the hash is random), so the answer is the
coarsest width *measured* to meet the target on the search path.

Held-out inputs, larger inputs (``size_factor``): at a fixed width the error grows with the
number of tokens per image (more queries fall into each bucket, so prototypes average over more
of them; singletons are exact), so a width that just meets the target on the calibration inputs
misses it on larger feature maps (a 5% calibration gave 6.2-6.9% on fresh inputs with 4x the
tokens per image). The search therefore meets the target on an *expected* error for inputs with
up to ``size_factor`` times the tokens: the error on the calibration inputs times its growth
from ``1/size_factor`` of their tokens (each image's real tokens split at random, with a fixed
seed, into disjoint subsets, pooled) to all of them, ``err_N * max(1, err_N / err_(N/f))`` (the
growth slows as the buckets fill, so one more factor ``f`` grows the error by at most that
much); the larger of that value at the width and at a 19% coarser one, so that a width does not
pass because the hash's fixed bucket offsets happen to fall well between one sample's tokens.
Measured on 32 calibrations and fresh draws of the same distributions (docs/act.md): at most
0.85x the target with 4x the tokens per image, 0.75x with 4x the images; the price is a width
about half the one that just meets the target on the calibration inputs (``size_factor=None``).
"""
import copy
import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .adaptive_clustering_attention import (AdaptiveClusteringAttention,
                                            adaptive_clustering_attention, query_spread)

__all__ = ['CalibrationResult', 'calibrate_bucket_width', 'calibrate_layer', 'layer_error']

_MAX_DOUBLINGS = 80
# With the size rule, the expected error is the larger of the values at the width and at a 19%
# coarser one: how the buckets' fixed offsets happen to fall between one sample's tokens must not
# pass a width (without this, 1 of 32 measured calibrations missed the target by 4%).
_ALIGNMENT_JITTER = 2.0**0.25


@dataclass
class CalibrationResult:
    """Outcome of :func:`calibrate_layer`.

    Attributes:
        bucket_width (float): the chosen width (absolute ``r``, or ``rho`` when ``relative``).
        relative (bool): whether ``bucket_width`` is a relative width.
        num_hashes (int): rounds ``L`` it was measured with.
        error (float): relative output error at that width on the calibration inputs.
        expected_error (float): the error expected at that width on inputs with up to
            ``size_factor`` times the tokens per image (what the target was met on; equal to
            ``error`` without the size rule).
        clusters (float): mean clusters per (image, head) with real tokens, at that width.
        trials (list): every (width, error, clusters) measured, in search order.
    """
    bucket_width: float
    relative: bool
    num_hashes: int
    error: float
    clusters: float
    trials: List[Tuple[float, float, float]] = field(default_factory=list)
    expected_error: Optional[float] = None


class _LayerInputs:
    """Per-head q, k, v of one layer on a list of batches, and its exact output."""

    @torch.no_grad()
    def __init__(self, attn: AdaptiveClusteringAttention, batches: Sequence[tuple]) -> None:
        self.attn = attn
        self.items = []
        for query, query_pos, key_padding_mask in batches:
            q, k, v, kpm, qpm = attn.project_heads(query, None, None, query_pos, None,
                                                   key_padding_mask)
            mask = None if kpm is None else ~kpm.view(kpm.shape[0], 1, 1, -1)
            exact = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, N, d)
            exact = self.merge(exact)
            real = torch.ones(exact.shape[:2], dtype=torch.bool, device=exact.device) \
                if qpm is None else ~qpm  # (B, N)
            self.items.append((q, k, v, kpm, qpm, exact, real))
        self.num_real = sum(int(real.sum()) for *_, real in self.items)
        if self.num_real == 0:
            raise ValueError('the calibration inputs have no real token (every query is padding '
                             'or there is none): there is nothing to measure the error on; pass '
                             'feature maps with real (key_padding_mask False) tokens')
        self.ref_norm2 = sum(float(exact[real].double().square().sum())
                             for *_, exact, real in self.items)
        spreads = [query_spread(q * attn.head_dims**-0.5, qpm)[1].flatten()
                   for q, _, _, _, qpm, _, _ in self.items]
        spreads = torch.cat(spreads)
        spreads = spreads[spreads > 0]
        self.spread = float(spreads.median()) if spreads.numel() else 1.0

    def merge(self, heads_out: Tensor) -> Tensor:
        batch, heads, num_queries, head_dims = heads_out.shape
        out = heads_out.transpose(1, 2).reshape(batch, num_queries, heads * head_dims)
        return self.attn.attn.out_proj(out)  # (B, N, E)

    @torch.no_grad()
    def evaluate(self, lsh, width: float, relative: bool) -> Tuple[float, float, bool]:
        """(relative error, mean clusters per real (image, head), every query a singleton)."""
        err2, cluster_sum, groups, singletons = 0.0, 0.0, 0, True
        for q, k, v, kpm, qpm, exact, real in self.items:
            result = adaptive_clustering_attention(
                q, k, v, lsh, key_padding_mask=kpm, query_padding_mask=qpm,
                bucket_width=None if relative else width,
                relative_bucket_width=width if relative else None)
            clusters = result.num_clusters  # (B, heads)
            diff = self.merge(result.output) - exact
            err2 += float(diff[real].double().square().sum())
            has_real = real.any(dim=1)  # (B,)
            cluster_sum += float(clusters[has_real].double().sum())
            groups += int(has_real.sum()) * clusters.shape[1]
            per_image = real.sum(dim=1, keepdim=True).expand_as(clusters)  # (B, heads)
            singletons &= bool((clusters >= per_image).all())
        error = math.sqrt(err2 / self.ref_norm2) if self.ref_norm2 > 0 else 0.0
        return error, cluster_sum / max(groups, 1), singletons


def _subsampled(batches: Sequence[tuple], factor: float, seed: int = 0) -> List[tuple]:
    """Each batch ``ceil(factor)`` times, each copy keeping a disjoint random ``1/factor`` of
    every image's real tokens (the rest become padding, for queries and keys alike): inputs with
    ``factor`` times fewer tokens per image, and all the tokens used once."""
    generator = torch.Generator().manual_seed(seed)
    copies = math.ceil(factor)
    out = []
    for query, query_pos, key_padding_mask, batch_first in batches:
        batch, tokens = (query.shape[0], query.shape[1]) if batch_first else \
            (query.shape[1], query.shape[0])
        mask = torch.zeros(batch, tokens, dtype=torch.bool) if key_padding_mask is None else \
            key_padding_mask.bool().cpu()
        masks = torch.ones(copies, batch, tokens, dtype=torch.bool)
        for image in range(batch):
            real = (~mask[image]).nonzero().flatten()
            order = real[torch.randperm(real.numel(), generator=generator)]
            size = max(1, int(round(real.numel() / factor)))
            for copy in range(copies):
                masks[copy, image, order[copy * size:(copy + 1) * size]] = False
        out += [(query, query_pos, m.to(query.device)) for m in masks if not m.all()]
    return out


def layer_error(attn: AdaptiveClusteringAttention, query: Tensor,
                query_pos: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None,
                bucket_width: Optional[float] = None,
                relative_bucket_width: Optional[float] = None) -> Tuple[float, float]:
    """(relative output error vs exact attention, mean clusters per head) of ``attn`` on inputs.

    Widths default to the layer's own (relative if it has one); nothing on the layer changes.
    """
    inputs = _LayerInputs(attn, [(query, query_pos, key_padding_mask)])
    if relative_bucket_width is None and bucket_width is None:
        relative_bucket_width = attn.relative_bucket_width
        bucket_width = attn.bucket_width
    relative = relative_bucket_width is not None
    error, clusters, _ = inputs.evaluate(
        attn.lsh, relative_bucket_width if relative else bucket_width, relative)
    return error, clusters


def calibrate_layer(attn: AdaptiveClusteringAttention,
                    batches: Sequence[tuple],
                    target_error: Optional[float] = 0.05,
                    target_clusters: Optional[float] = None,
                    relative: bool = False,
                    num_hashes: Optional[int] = None,
                    refine_steps: int = 6,
                    size_factor: Optional[float] = 4.0) -> CalibrationResult:
    """Coarsest width of ``attn`` meeting a target on ``batches`` and on larger inputs of the
    same kind.

    Args:
        attn (AdaptiveClusteringAttention): the layer (its weights and hash); left unchanged.
        batches (list[tuple]): ``(query, query_pos, key_padding_mask)`` per batch, as the
            encoder passes them (``batch_first`` as the layer is built; pos/mask may be None).
        target_error (float): keep the relative output error below this (> 0).
        target_clusters (float, optional): instead, the finest width with at most this many
            clusters per (image, head) on average (>= 1); ``target_error`` is then ignored.
        relative (bool): calibrate the scale-free ``relative_bucket_width`` instead of the
            absolute ``bucket_width``.
        num_hashes (int, optional): measure with this many rounds instead of the layer's (the
            layer's first rounds, completed from its seed).
        refine_steps (int): bisections inside the bracket (each halves its log-width).
        size_factor (float, optional): meet ``target_error`` on the error expected for inputs
            with up to this many times the tokens per image (see the module docstring; >= 1).
            None or 1: on the calibration inputs only. Ignored for ``target_clusters``.

    Raises:
        ValueError: a bad target, inputs without a real token, or a target no width meets
            (naming the best value reached).
    """
    if target_clusters is not None:
        if isinstance(target_clusters, bool) or not isinstance(target_clusters, (int, float)) \
                or not math.isfinite(target_clusters) or target_clusters < 1:
            raise ValueError(f'target_clusters must be a finite number >= 1, got '
                             f'{target_clusters!r}')
    elif isinstance(target_error, bool) or not isinstance(target_error, (int, float)) or \
            not math.isfinite(target_error) or not target_error > 0:
        raise ValueError(f'target_error must be a finite number > 0, got {target_error!r}')
    if not isinstance(attn, AdaptiveClusteringAttention):
        raise TypeError(f'attn must be an AdaptiveClusteringAttention, got {type(attn).__name__}')
    if size_factor is not None and (isinstance(size_factor, bool) or not isinstance(
            size_factor, (int, float)) or not math.isfinite(size_factor) or size_factor < 1):
        raise ValueError(f'size_factor must be a finite number >= 1 or None, got {size_factor!r}')
    lsh = attn.lsh
    if num_hashes is not None and num_hashes != lsh.num_hashes:
        lsh = copy.deepcopy(lsh)
        lsh.set_num_hashes(num_hashes)
    inputs = _LayerInputs(attn, batches)
    scale = 1.0 if relative else inputs.spread
    sized = target_clusters is None and size_factor is not None and size_factor > 1
    subsample = _LayerInputs(attn, _subsampled(
        [(*b, attn.batch_first) for b in batches], size_factor)) if sized else None
    trials = []
    expected = {}  # width -> expected error at size_factor x the tokens

    def _expected(width, error):
        # growth from 1/f of the tokens to all of them, once more (it slows down as the buckets
        # fill, so this bounds the growth to f times the tokens)
        small = subsample.evaluate(lsh, width, relative)[0]
        return error * (max(1.0, error / small) if small > 0 else 2.0)

    def measure(width):
        error, clusters, singletons = inputs.evaluate(lsh, width, relative)
        trials.append((width, error, clusters))
        if sized:
            expected[width] = max(_expected(width, error), _expected(
                width * _ALIGNMENT_JITTER, inputs.evaluate(lsh, width * _ALIGNMENT_JITTER,
                                                           relative)[0]))
        else:
            expected[width] = error
        return expected[width], clusters, singletons

    def meets(error, clusters):
        if target_clusters is not None:
            return clusters <= target_clusters
        return error < target_error

    def result(width, error, clusters):
        measured = next(t[1] for t in reversed(trials) if t[0] == width)
        return CalibrationResult(width, relative, lsh.num_hashes, measured, clusters, trials,
                                 expected_error=error)

    # Coarse end: double until every head is a single cluster.
    k = 4
    while True:
        width = scale * 2.0**k
        error, clusters, _ = measure(width)
        if clusters <= 1.0 or k >= _MAX_DOUBLINGS:
            break
        k += 1
    if target_clusters is None and meets(error, clusters):
        return result(width, error, clusters)  # one prototype per head is already enough
    if target_clusters is not None and not meets(error, clusters):
        raise ValueError(f'no bucket width meets target_clusters={target_clusters}: the fewest '
                         f'clusters reached is {clusters:.3g} per head (bucket_width {width:.3g})')
    coarse = (width, error, clusters)  # for error: fails; for clusters: meets
    # Scan towards the exact limit (every real query its own cluster).
    while True:
        k -= 1
        width = scale * 2.0**k
        error, clusters, singletons = measure(width)
        if target_clusters is None and meets(error, clusters):
            fine = (width, error, clusters)  # meets
            break
        if target_clusters is not None and not meets(error, clusters):
            fine = (width, error, clusters)  # fails
            break
        if target_clusters is None and (singletons or k <= -_MAX_DOUBLINGS):
            best = min(trials, key=lambda t: expected[t[0]])
            raise ValueError(
                f'no bucket width meets target_error={target_error}: the best relative error '
                f'reached is {best[1]:.3g} (expected {expected[best[0]]:.3g} on inputs with '
                f'{size_factor}x the tokens; bucket_width {best[0]:.3g}, {best[2]:.3g} clusters '
                'per head); even one cluster per query does not meet it')
        if target_clusters is not None and (singletons or k <= -_MAX_DOUBLINGS):
            return result(width, error, clusters)  # even singletons meet the cluster target
        coarse = (width, error, clusters)
    # Bisect (geometric mean) between the failing and the meeting end of the bracket.
    passing, failing = (fine, coarse) if target_clusters is None else (coarse, fine)
    for _ in range(refine_steps):
        width = math.sqrt(passing[0] * failing[0])
        error, clusters, _ = measure(width)
        if meets(error, clusters):
            passing = (width, error, clusters)
        else:
            failing = (width, error, clusters)
    return result(*passing)


def calibrate_bucket_width(attn: AdaptiveClusteringAttention,
                           query: Tensor,
                           query_pos: Optional[Tensor] = None,
                           key_padding_mask: Optional[Tensor] = None,
                           target_error: float = 0.05,
                           size_factor: Optional[float] = 4.0) -> float:
    """Largest absolute ``bucket_width`` keeping ``attn``'s relative output error < target, on
    these inputs and on fresh ones of the same kind with up to ``size_factor`` times the tokens.

    ``attn`` is measured with its own weights and its current ``num_hashes`` on ``query`` /
    ``query_pos`` / ``key_padding_mask`` as the encoder passes them (``batch_first`` as the
    layer is built); the error is against the layer's exact attention, over real tokens. Nothing
    on the layer changes. See :func:`calibrate_layer` for the search and for the relative
    (scale-free) and cluster-count variants.

    Raises:
        ValueError: ``target_error`` not a finite number > 0, no real token in the inputs, or
            no width meets it (the message names the best error reached).
    """
    return calibrate_layer(attn, [(query, query_pos, key_padding_mask)],
                           target_error=target_error, size_factor=size_factor).bucket_width
