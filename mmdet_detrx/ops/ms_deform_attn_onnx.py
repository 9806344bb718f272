"""ONNX lowering of ``detrx::ms_deform_attn_forward``: the op itself says how it exports.

Registered with the TorchScript ONNX exporter (``torch.onnx.export(..., dynamo=False)``, the one
mmdet's DETR code traces with) for every opset, so any model calling
:func:`mmdet_detrx.ops.ms_deform_attn` exports without preparation. Two lowerings, chosen with
:func:`ms_deform_attn_onnx_lowering` around the export (default ``'grid_sample'``):

* ``'grid_sample'``: per level ``l``, standard ONNX ops (GridSample needs opset >= 16)::

      H_l, W_l = spatial_shapes[l]
      v_l = value[:, start_l : start_l + H_l * W_l]       # (B, H_l*W_l, heads, C)
      v_l -> (B*heads, C, H_l, W_l)
      g_l = 2 * sampling_locations[:, :, :, l] - 1        # (B, Q, heads, P, 2) -> (B*heads, Q, P, 2)
      s_l = GridSample(v_l, g_l, bilinear, zeros, align_corners=0)   # (B*heads, C, Q, P)

  then the sum over (l, p) of ``s * attention_weights``: the semantics of
  :func:`mmdet_detrx.ops.ms_deform_attn_pytorch` (Deformable DETR, Eq. 3). Only the number of
  levels is fixed at export (static in every DETR); every size is read from tensors at run time,
  so one graph serves any image size. Runs in ONNX Runtime.
* ``'trt-plugin'``: one ``trt::MultiscaleDeformableAttnPlugin_TRT`` node, TensorRT's plugin
  (8.6+), which takes exactly the op's inputs (index tensors cast to int32) and returns
  ``(B, Q, heads, C)``. ONNX Runtime cannot run it; :mod:`mmdet_detrx.deploy.msda_decomposition`
  expands such nodes of an existing file with the same :func:`grid_sample_decomposition`.

``use_pytorch_ms_deform_attn()`` remains the way to export the ``grid_sample`` reference's own
trace instead (standard ops, no custom node at any point).
"""
import contextlib
from typing import Iterator

import numpy as np
import torch

__all__ = ['GRID_SAMPLE_MIN_OPSET', 'ONNX_LOWERINGS', 'PLUGIN_DOMAIN', 'PLUGIN_OP_TYPE',
           'grid_sample_decomposition', 'ms_deform_attn_onnx_lowering']

ONNX_LOWERINGS = ('grid_sample', 'trt-plugin')
GRID_SAMPLE_MIN_OPSET = 16
# TensorRT's parser hands an op type it has no importer for to the plugin registry (plugin
# version "1", empty namespace); it does not read the domain. The custom domain keeps
# onnx.checker happy (NVIDIA TAO's Deformable DETR export does the same).
PLUGIN_DOMAIN = 'trt'
PLUGIN_OP_TYPE = 'MultiscaleDeformableAttnPlugin_TRT'
NUM_LEVELS_ATTR = 'detrx_num_levels'  # export-time only: kept for the expansion, else stripped
_ONNX_INT32, _ONNX_INT64 = 6, 7  # TensorProto.INT32 / INT64
_lowering = 'grid_sample'


@contextlib.contextmanager
def ms_deform_attn_onnx_lowering(lowering: str) -> Iterator[None]:
    """Export ``detrx::ms_deform_attn_forward`` as ``lowering`` (``'grid_sample'`` or
    ``'trt-plugin'``) inside the block."""
    global _lowering
    if lowering not in ONNX_LOWERINGS:
        raise ValueError(f'ms_deform_attn: ONNX lowering must be one of {ONNX_LOWERINGS}, '
                         f'got {lowering!r}')
    previous, _lowering = _lowering, lowering
    try:
        yield
    finally:
        _lowering = previous


def grid_sample_decomposition(b, value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights, num_levels: int, opset: int,
                              output_name=None):
    """Writes the ``'grid_sample'`` lowering with builder ``b`` and returns the output
    ``(B, Q, heads, C)``.

    ``b`` emits ONNX nodes: ``b.op(op_type, inputs, outputs=None, **attributes)`` returns the
    first output, ``b.const(values, dtype)`` a constant. The exporter's graph context and the
    ONNX-proto expansion of plugin nodes both provide one, so both write this same graph.
    Index inputs may be int32 (the plugin's) or int64.
    """
    shapes = b.op('Cast', [spatial_shapes], to=_ONNX_INT64)  # (L, 2)
    starts = b.op('Cast', [level_start_index], to=_ONNX_INT64)  # (L,)
    value_shape = b.op('Shape', [value])  # [B, S, heads, C]
    batch = b.op('Slice', [value_shape, b.const([0]), b.const([1])])
    heads_channels = b.op('Slice', [value_shape, b.const([2]), b.const([4])])  # [heads, C]
    channels = b.op('Slice', [value_shape, b.const([3]), b.const([4])])
    minus_one = b.const([-1])
    grid_mode = 'bilinear' if opset < 20 else 'linear'

    sampled = []
    for level in range(num_levels):
        row = b.op('Gather', [shapes, b.const(level)], axis=0)  # (2,) = [H_l, W_l]
        size = b.op('ReduceProd', [row], keepdims=1)  # [H_l * W_l]
        start = b.op('Gather', [starts, b.const([level])], axis=0)  # [start_l]
        end = b.op('Add', [start, size])
        value_l = b.op('Slice', [value, start, end, b.const([1])])  # (B, HW, heads, C)
        value_l = b.op('Transpose', [value_l], perm=[0, 2, 3, 1])  # (B, heads, C, HW)
        value_l = b.op('Reshape', [value_l, b.op('Concat', [minus_one, channels, row], axis=0)])
        # value_l: (B*heads, C, H_l, W_l)
        grid = b.op('Gather', [sampling_locations, b.const(level)], axis=3)  # (B, Q, heads, P, 2)
        grid = b.op('Transpose', [grid], perm=[0, 2, 1, 3, 4])  # (B, heads, Q, P, 2)
        grid_tail = b.op('Slice', [b.op('Shape', [grid]), b.const([2]), b.const([5])])
        grid = b.op('Reshape', [grid, b.op('Concat', [minus_one, grid_tail], axis=0)])
        grid = b.op('Sub', [b.op('Mul', [grid, b.const(2.0, np.float32)]),
                            b.const(1.0, np.float32)])  # [0, 1] -> [-1, 1]
        sampled.append(b.op('GridSample', [value_l, grid], mode=grid_mode,
                            padding_mode='zeros', align_corners=0))  # (B*heads, C, Q, P)
    sampled = b.op('Concat', sampled, axis=-1)  # (B*heads, C, Q, L*P), level-major

    weights = b.op('Transpose', [attention_weights], perm=[0, 2, 1, 3, 4])  # (B, heads, Q, L, P)
    weights = b.op('Reshape', [weights, b.const([0, 0, 0, -1])])  # (B, heads, Q, L*P)
    weights = b.op('Reshape', [weights, b.const([-1, 1, 0, 0])])  # (B*heads, 1, Q, L*P)
    output = b.op('ReduceSum', [b.op('Mul', [sampled, weights]), b.const([-1])],
                  keepdims=0)  # (B*heads, C, Q)
    output = b.op('Reshape', [output, b.op('Concat', [batch, heads_channels, minus_one],
                                           axis=0)])  # (B, heads, C, Q)
    return b.op('Transpose', [output], outputs=None if output_name is None else [output_name],
                perm=[0, 3, 1, 2])  # (B, Q, heads, C)


class _ExporterBuilder:
    """``grid_sample_decomposition``'s builder over the TorchScript exporter's graph context."""

    def __init__(self, g):
        self.g = g

    def const(self, values, dtype=np.int64):
        return self.g.op('Constant', value_t=torch.from_numpy(np.asarray(values, dtype=dtype)))

    def op(self, op_type, inputs, outputs=None, **attributes):
        kinds = {str: 's', float: 'f'}  # ints and int lists: 'i'
        named = {f'{name}_{kinds.get(type(value), "i")}': value
                 for name, value in attributes.items()}
        return self.g.op(op_type, *inputs, **named)


def _static_levels(sampling_locations, spatial_shapes):
    from torch.onnx import symbolic_helper
    location_sizes = symbolic_helper._get_tensor_sizes(sampling_locations) or [None] * 6
    shape_sizes = symbolic_helper._get_tensor_sizes(spatial_shapes) or [None]
    return location_sizes[3] if location_sizes[3] is not None else shape_sizes[0]


def _plugin_node(g, value, spatial_shapes, level_start_index, sampling_locations,
                 attention_weights, num_levels):
    from torch.onnx import symbolic_helper
    shapes32 = g.op('Cast', spatial_shapes, to_i=_ONNX_INT32)
    starts32 = g.op('Cast', level_start_index, to_i=_ONNX_INT32)
    attrs = {} if num_levels is None else {f'{NUM_LEVELS_ATTR}_i': int(num_levels)}
    output = g.op(f'{PLUGIN_DOMAIN}::{PLUGIN_OP_TYPE}', value, shapes32, starts32,
                  sampling_locations, attention_weights, **attrs)
    value_sizes = symbolic_helper._get_tensor_sizes(value) or [None] * 4
    location_sizes = symbolic_helper._get_tensor_sizes(sampling_locations) or [None] * 6
    # (B, Q, heads, C): lets the exporter's shape inference continue past the custom node.
    output.setType(value.type().with_sizes(
        [value_sizes[0], location_sizes[1], value_sizes[2], value_sizes[3]]))
    return output


def _symbolic(g, value, spatial_shapes, level_start_index, sampling_locations,
              attention_weights, im2col_step):
    num_levels = _static_levels(sampling_locations, spatial_shapes)
    if _lowering == 'trt-plugin':
        output = _plugin_node(g, value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights, num_levels)
    else:
        opset = g.opset  # the export's opset (the exporter's graph context carries it)
        if opset < GRID_SAMPLE_MIN_OPSET:
            raise ValueError(f'ms_deform_attn: the grid_sample ONNX lowering needs opset >= '
                             f'{GRID_SAMPLE_MIN_OPSET} (GridSample), got opset {opset}; use a '
                             "newer opset or ms_deform_attn_onnx_lowering('trt-plugin')")
        if num_levels is None:
            raise ValueError('ms_deform_attn: the grid_sample ONNX lowering needs a static '
                             'number of levels (dim 3 of sampling_locations)')
        output = grid_sample_decomposition(_ExporterBuilder(g), value, spatial_shapes,
                                           level_start_index, sampling_locations,
                                           attention_weights, int(num_levels), opset)
    # (B, Q, heads, C) -> (B, Q, heads * C), what the op returns
    return g.op('Reshape', output, g.op('Constant', value_t=torch.tensor([0, 0, -1])))


def register_onnx_lowering() -> None:
    """Register the lowering for every opset (the exporter picks the newest registration at or
    below the export's opset)."""
    torch.onnx.register_custom_op_symbolic('detrx::ms_deform_attn_forward', _symbolic, 1)
