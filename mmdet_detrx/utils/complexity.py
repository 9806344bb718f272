"""FLOP formulas of the operations mmengine and torch cannot count, in one place.

Four operations, each with one formula on shapes (or, for ACT, on what a forward found):

* ``detrx::ms_deform_attn_forward`` (our deformable attention op): for every output channel of
  every (batch, query, head, level, point) the op bilinearly interpolates 4 corners (4 MACs, as
  mmengine counts ``aten::grid_sampler``) and adds the sample times its attention weight
  (1 MAC)::

      MACs = 5 * B * Q * heads * L * P * C

  with value ``(B, S, heads, C)`` and sampling_locations ``(B, Q, heads, L, P, 2)``. The
  projections around the op are ``aten::linear`` and counted already.
* scaled dot-product attention (``aten::scaled_dot_product_attention``, no mmengine handle; on
  CPU ``aten::_scaled_dot_product_flash_attention_for_cpu``, which torch's ``FlopCounterMode``
  does not count): ``q k^T`` and ``softmax(.) v``, ``MACs = prod(batch) * N * S * (d_qk + d_v)``.
* oneDNN's linear (``mkldnn::_linear_pointwise``, what our packed linear layers run in CPU
  float32 inference, :mod:`mmdet_detrx.models.detectors.packed_linear`): ``aten::addmm``'s
  count, ``MACs = rows * in_features * out_features``, the bias not counted. Only
  ``FlopCounterMode`` needs it: under a ``torch.jit`` trace the layers run ``aten::linear``.
* ACT (:class:`~mmdet_detrx.models.layers.AdaptiveClusteringAttention`), whose cost depends on
  the clusters the data formed: :func:`act_flops` of a forward's record
  (:class:`~mmdet_detrx.models.layers.ACTForward`).

Who uses them:

* mmengine's ``FlopAnalyzer`` (behind mmdet's ``tools/analysis_tools/get_flops.py``, ours and
  ``benchmark_backbones.py``) traces the model with ``torch.jit`` and counts each node by its
  kind through a table of handles, listing unknown kinds as unsupported (counted 0).
  :func:`register_flop_handles` (called by ``import mmdet_detrx``) adds the MSDA and SDPA handles
  to that table, ``_DEFAULT_SUPPORTED_FLOP_OPS``, which every analyzer copies when it is created
  (mmengine has no public registration API; ``set_op_handle`` per analyzer works too), and to
  ``ActivationAnalyzer``'s. ACT layers are traced as their exact operations; our ``get_flops.py``
  and ``act_tradeoff.py`` replace them by :func:`act_flops`.
* torch's ``FlopCounterMode`` (``benchmark_detectors.py``) through :func:`flop_counter_mode`,
  whose ``custom_mapping`` holds the same formulas and oneDNN's linear (FlopCounterMode counts
  2 FLOPs per MAC; the CPU SDPA backward with torch's own formula for its GPU SDPA kernels; the
  deformable op's backward is not counted; oneDNN's linear has none).

Convention (mmengine / mmdet): one multiply-accumulate = one FLOP.
"""
from collections import Counter
from typing import Any, List, Sequence

import torch

__all__ = ['MS_DEFORM_ATTN_MACS_PER_SAMPLE', 'act_flops', 'flop_counter_mode',
           'ms_deform_attn_flop_jit', 'ms_deform_attn_macs', 'register_flop_handles',
           'sdpa_flop_jit', 'sdpa_macs']

MS_DEFORM_ATTN_OP = 'detrx::ms_deform_attn_forward'
SDPA_OP = 'aten::scaled_dot_product_attention'
MS_DEFORM_ATTN_MACS_PER_SAMPLE = 5  # 4 bilinear corners + 1 attention weight, per channel


def _product(sizes: Sequence[int]) -> int:
    count = 1
    for size in sizes:
        count *= int(size)
    return count


def ms_deform_attn_macs(value_shape: Sequence[int], locations_shape: Sequence[int]) -> int:
    """MACs of one deformable-attention call from value (B, S, heads, C) and sampling
    locations (B, Q, heads, L, P, 2)."""
    batch, _, heads, channels = value_shape
    _, queries, _, levels, points, _ = locations_shape
    return MS_DEFORM_ATTN_MACS_PER_SAMPLE * batch * queries * heads * levels * points * channels


def sdpa_macs(query_shape: Sequence[int], key_shape: Sequence[int],
              value_shape: Sequence[int]) -> int:
    """MACs of ``scaled_dot_product_attention(q, k, v)``: q kᵀ and (softmax) v."""
    *batch, num_queries, qk_dims = query_shape
    return _product(batch) * num_queries * key_shape[-2] * (qk_dims + value_shape[-1])


def act_flops(record, embed_dims: int) -> torch.Tensor:
    """Multiply-accumulates of one ACT forward, per image (B,), counting real tokens only.

    ``record`` is the forward's :class:`~mmdet_detrx.models.layers.ACTForward`. Both modes:
    ``4 N E^2`` for the q/k/v/out projections. Exact attention (``num_clusters`` None):
    ``2 N S E`` (q.k and attention.v over all pairs, the N^2 terms). ACT: ``N L E`` (hashing,
    L rounds per head), ``N E`` (prototype means) and ``2 S d sum_h C_h`` (each head's C_h
    prototypes against the S keys).
    """
    n = record.num_queries.double()
    s = record.num_keys.double()
    e = float(embed_dims)
    flops = 4 * n * e * e
    if record.num_clusters is None:  # exact attention
        return flops + 2 * n * s * e
    head_dims = e / record.num_clusters.shape[1]
    clusters = record.num_clusters.double().sum(dim=1)  # (B,) summed over heads
    return flops + n * record.num_hashes * e + n * e + 2 * s * head_dims * clusters


def _static_shapes(op: str, names: str, *values) -> List[List[int]]:
    from mmengine.analysis.jit_handles import get_shape
    shapes = [get_shape(value) for value in values]
    if any(shape is None for shape in shapes):
        raise ValueError(f'{op}: the trace has no static shapes for {names}, so its FLOPs '
                         'cannot be counted')
    return shapes


def ms_deform_attn_flop_jit(inputs: List[Any], outputs: List[Any]) -> Counter:
    """mmengine handle: FLOPs of one ``detrx::ms_deform_attn_forward`` node from its shapes."""
    value_shape, locations_shape = _static_shapes(
        MS_DEFORM_ATTN_OP, 'value / sampling_locations', inputs[0], inputs[3])
    return Counter({'ms_deform_attn': ms_deform_attn_macs(value_shape, locations_shape)})


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> Counter:
    """mmengine handle: FLOPs of one ``aten::scaled_dot_product_attention`` node."""
    return Counter({'scaled_dot_product_attention':
                    sdpa_macs(*_static_shapes(SDPA_OP, 'query / key / value', *inputs[:3]))})


def register_flop_handles() -> None:
    """Adds our handles to those every new ``mmengine.analysis.FlopAnalyzer`` starts with, and
    to ``ActivationAnalyzer``'s (activations = output elements, as mmengine counts for linear
    and conv): ``get_model_complexity_info`` runs both. Existing entries are kept."""
    from mmengine.analysis import complexity_analysis
    from mmengine.analysis.jit_handles import generic_activation_jit
    for op, handle, name in ((MS_DEFORM_ATTN_OP, ms_deform_attn_flop_jit, 'ms_deform_attn'),
                             (SDPA_OP, sdpa_flop_jit, 'scaled_dot_product_attention')):
        complexity_analysis._DEFAULT_SUPPORTED_FLOP_OPS.setdefault(op, handle)
        complexity_analysis._DEFAULT_SUPPORTED_ACT_OPS.setdefault(op,
                                                                  generic_activation_jit(name))


def _flop_counter_formulas() -> dict:
    """``FlopCounterMode`` formulas (FLOPs = 2 x MACs) of the ops it lacks, by overload packet."""

    def ms_deform_attn(value_shape, spatial_shapes, level_start_index, locations_shape,
                       *args, **kwargs) -> int:
        return 2 * ms_deform_attn_macs(value_shape, locations_shape)

    def sdpa(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
        return 2 * sdpa_macs(query_shape, key_shape, value_shape)

    def onednn_linear(input_shape, *args, out_shape, **kwargs) -> int:
        # (..., in_features) -> (..., out_features): 2 x rows x in x out, as aten::addmm.
        return 2 * _product(out_shape) * input_shape[-1]

    def sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args,
                      **kwargs) -> int:  # torch's formula for its GPU kernels' backward
        from torch.utils.flop_counter import sdpa_backward_flop_count
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    aten = torch.ops.aten
    formulas = {aten._scaled_dot_product_flash_attention_for_cpu: sdpa,
                aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_backward}
    if hasattr(torch.ops.mkldnn, '_linear_pointwise'):
        formulas[torch.ops.mkldnn._linear_pointwise] = onednn_linear
    from mmdet_detrx.ops import native_available
    if native_available():
        formulas[torch.ops.detrx.ms_deform_attn_forward] = ms_deform_attn
    return formulas


def flop_counter_mode(**kwargs):
    """torch's ``FlopCounterMode(**kwargs)`` that also counts our deformable attention op
    (forward), CPU scaled dot-product attention (forward with the formula above, backward
    with torch's formula for its GPU kernels) and oneDNN's linear (our packed linear layers)."""
    from torch.utils.flop_counter import FlopCounterMode
    return FlopCounterMode(custom_mapping=_flop_counter_formulas(), **kwargs)
