"""FLOPs of our native ops for mmengine's complexity analysis (``mmengine.analysis``).

``FlopAnalyzer`` (behind mmdet's ``tools/analysis_tools/get_flops.py`` and ours) traces the model
with ``torch.jit`` and counts each node by its kind through a table of handles; without one it
lists ``detrx::ms_deform_attn_forward`` as unsupported and counts 0, so a Deformable DETR / DINO
was undercounted by its whole deformable attention core. :func:`register_flop_handles` (called by
``import mmdet_detrx``) adds our handle to that table, ``_DEFAULT_SUPPORTED_FLOP_OPS``, which every
analyzer copies when it is created. mmengine has no public registration API; the table is the
extension point its own docs point at (``set_op_handle`` per analyzer works too).

Convention (mmengine / mmdet): one multiply-accumulate = one FLOP. For every output channel of
every (batch, query, head, level, point) the op bilinearly interpolates 4 corners (4 MACs, as
mmengine counts ``aten::grid_sampler``) and adds the sample times its attention weight (1 MAC)::

    FLOPs = 5 * B * Q * heads * L * P * C

with value ``(B, S, heads, C)`` and sampling_locations ``(B, Q, heads, L, P, 2)``. The
projections around the op (value / offset / weight / output linears) are ``aten::linear`` and
counted by mmengine already. Activations (``ActivationAnalyzer``): the output's elements,
``B * Q * heads * C``.
"""
from collections import Counter
from typing import Any, List

__all__ = ['MS_DEFORM_ATTN_MACS_PER_SAMPLE', 'ms_deform_attn_flop_jit', 'register_flop_handles']

MS_DEFORM_ATTN_OP = 'detrx::ms_deform_attn_forward'
MS_DEFORM_ATTN_MACS_PER_SAMPLE = 5  # 4 bilinear corners + 1 attention weight, per channel


def ms_deform_attn_flop_jit(inputs: List[Any], outputs: List[Any]) -> Counter:
    """mmengine handle: FLOPs of one ``detrx::ms_deform_attn_forward`` node from its shapes."""
    from mmengine.analysis.jit_handles import get_shape
    value_shape = get_shape(inputs[0])
    locations_shape = get_shape(inputs[3])
    if value_shape is None or locations_shape is None:
        raise ValueError(f'{MS_DEFORM_ATTN_OP}: the trace has no static shapes for value / '
                         'sampling_locations, so its FLOPs cannot be counted')
    batch, _, heads, channels = value_shape
    _, queries, _, levels, points, _ = locations_shape
    flops = MS_DEFORM_ATTN_MACS_PER_SAMPLE * batch * queries * heads * levels * points * channels
    return Counter({'ms_deform_attn': flops})


def register_flop_handles() -> None:
    """Adds our ops to the handles every new ``mmengine.analysis.FlopAnalyzer`` starts with, and
    to ``ActivationAnalyzer``'s (activations = output elements, as mmengine counts for linear
    and conv): ``get_model_complexity_info`` runs both."""
    from mmengine.analysis import complexity_analysis
    from mmengine.analysis.jit_handles import generic_activation_jit
    complexity_analysis._DEFAULT_SUPPORTED_FLOP_OPS.setdefault(MS_DEFORM_ATTN_OP,
                                                               ms_deform_attn_flop_jit)
    complexity_analysis._DEFAULT_SUPPORTED_ACT_OPS.setdefault(
        MS_DEFORM_ATTN_OP, generic_activation_jit('ms_deform_attn'))
