"""Expand TensorRT MSDA plugin nodes of an ONNX model into standard ONNX ops (GridSample).

Each ``trt::MultiscaleDeformableAttnPlugin_TRT`` node (inputs and output as in
:mod:`.msda_plugin`) becomes, per level ``l`` (``L`` levels: the export-time attribute the
symbolic wrote, else the static dim 3 of ``attention_weights`` from ONNX shape inference; every
other size is read from tensors at run time, so the graph stays valid for dynamic image
sizes)::

    H_l, W_l = spatial_shapes[l]                      # (int32 -> int64)
    v_l  = value[:, start_l : start_l + H_l * W_l]    # (B, H_l*W_l, heads, C)
    v_l  -> (B*heads, C, H_l, W_l)
    g_l  = 2 * sampling_locations[:, :, :, l] - 1     # (B, Q, heads, P, 2) -> (B*heads, Q, P, 2)
    s_l  = GridSample(v_l, g_l, bilinear, zeros, align_corners=0)   # (B*heads, C, Q, P)

then ``sum over (l, p) of s * attention_weights`` -> (B, Q, heads, C): the semantics of
``mmdet_detrx.ops.ms_deform_attn_pytorch`` (Deformable DETR, Eq. 3). GridSample needs opset 16
(its bilinear mode is named ``linear`` from opset 20 on).
"""
import itertools
from typing import List, Optional

import onnx
from onnx import TensorProto, helper, numpy_helper
import numpy as np

from .msda_plugin import NUM_LEVELS_ATTR, PLUGIN_DOMAIN, PLUGIN_OP_TYPE, is_plugin_node

__all__ = ['GRID_SAMPLE_MIN_OPSET', 'count_plugin_nodes', 'expand_msda_plugin_nodes']

GRID_SAMPLE_MIN_OPSET = 16


def count_plugin_nodes(model: onnx.ModelProto) -> int:
    return sum(is_plugin_node(node) for node in model.graph.node)


def _default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ('', 'ai.onnx'):
            return entry.version
    raise ValueError('the ONNX model imports no default-domain opset')


def _static_dim(model: onnx.ModelProto, name: str, axis: int) -> Optional[int]:
    infos = itertools.chain(model.graph.value_info, model.graph.input, model.graph.output)
    for info in infos:
        if info.name == name:
            dims = info.type.tensor_type.shape.dim
            if len(dims) > axis and dims[axis].HasField('dim_value'):
                return dims[axis].dim_value
    return None


class _Builder:
    """Appends nodes with names unique within one plugin node's expansion."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: List[onnx.NodeProto] = []
        self.initializers: List[onnx.TensorProto] = []
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f'{self.prefix}/{hint}_{self._count}'

    def const(self, values, dtype=np.int64) -> str:
        name = self._name('const')
        self.initializers.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs, outputs: Optional[List[str]] = None, **attrs) -> str:
        outputs = outputs or [self._name(op_type)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs,
                                           name=self._name(op_type + '_node'), **attrs))
        return outputs[0]


def _expand_one(node: onnx.NodeProto, num_levels: int, opset: int, prefix: str) -> _Builder:
    value, shapes32, starts32, locations, weights = node.input
    b = _Builder(prefix)
    shapes = b.op('Cast', [shapes32], to=TensorProto.INT64)  # (L, 2)
    starts = b.op('Cast', [starts32], to=TensorProto.INT64)  # (L,)
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
        grid = b.op('Gather', [locations, b.const(level)], axis=3)  # (B, Q, heads, P, 2)
        grid = b.op('Transpose', [grid], perm=[0, 2, 1, 3, 4])  # (B, heads, Q, P, 2)
        grid_tail = b.op('Slice', [b.op('Shape', [grid]), b.const([2]), b.const([5])])
        grid = b.op('Reshape', [grid, b.op('Concat', [minus_one, grid_tail], axis=0)])
        grid = b.op('Sub', [b.op('Mul', [grid, b.const(2.0, np.float32)]),
                            b.const(1.0, np.float32)])  # [0, 1] -> [-1, 1]
        sampled.append(b.op('GridSample', [value_l, grid], mode=grid_mode,
                            padding_mode='zeros', align_corners=0))  # (B*heads, C, Q, P)
    sampled = b.op('Concat', sampled, axis=-1)  # (B*heads, C, Q, L*P), level-major

    weights = b.op('Transpose', [weights], perm=[0, 2, 1, 3, 4])  # (B, heads, Q, L, P)
    weights = b.op('Reshape', [weights, b.const([0, 0, 0, -1])])  # (B, heads, Q, L*P)
    weights = b.op('Reshape', [weights, b.const([-1, 1, 0, 0])])  # (B*heads, 1, Q, L*P)
    output = b.op('ReduceSum', [b.op('Mul', [sampled, weights]), b.const([-1])],
                  keepdims=0)  # (B*heads, C, Q)
    output = b.op('Reshape', [output, b.op('Concat', [batch, heads_channels, minus_one],
                                           axis=0)])  # (B, heads, C, Q)
    b.op('Transpose', [output], outputs=[node.output[0]], perm=[0, 3, 1, 2])  # (B, Q, heads, C)
    return b


def expand_msda_plugin_nodes(model: onnx.ModelProto) -> int:
    """Replace every plugin node of ``model`` (in place) by its GridSample decomposition.

    Returns the number of nodes replaced. Raises ValueError if the model's opset has no
    GridSample or a node's number of levels is not static.
    """
    opset = _default_opset(model)
    if count_plugin_nodes(model) == 0:
        return 0
    if opset < GRID_SAMPLE_MIN_OPSET:
        raise ValueError(f'the grid_sample decomposition of multi-scale deformable attention '
                         f'needs ONNX opset >= {GRID_SAMPLE_MIN_OPSET} (GridSample); the model '
                         f'has opset {opset}')
    inferred = None
    new_nodes, replaced = [], 0
    for index, node in enumerate(model.graph.node):
        if not is_plugin_node(node):
            new_nodes.append(node)
            continue
        num_levels = next((a.i for a in node.attribute if a.name == NUM_LEVELS_ATTR), None)
        if num_levels is None:
            if inferred is None:
                inferred = onnx.shape_inference.infer_shapes(model)
            num_levels = _static_dim(inferred, node.input[4], 3)
        if num_levels is None:
            raise ValueError(f'cannot expand {node.name or PLUGIN_OP_TYPE}: the number of '
                             f'levels (dim 3 of {node.input[4]}) is not static')
        builder = _expand_one(node, num_levels, opset, prefix=f'{node.name or "msda"}_{index}')
        new_nodes.extend(builder.nodes)
        model.graph.initializer.extend(builder.initializers)
        replaced += 1
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    if not any(n.domain == PLUGIN_DOMAIN for n in model.graph.node):
        kept = [entry for entry in model.opset_import if entry.domain != PLUGIN_DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(kept)
    return replaced
