"""Expand TensorRT MSDA plugin nodes of an ONNX model into standard ONNX ops (GridSample).

Each ``trt::MultiscaleDeformableAttnPlugin_TRT`` node (inputs and output as in
:mod:`.msda_plugin`) becomes the op's ``'grid_sample'`` ONNX lowering,
:func:`mmdet_detrx.ops.ms_deform_attn_onnx.grid_sample_decomposition` (the same graph the
exporter writes for the op directly), for the number of levels of the node: the export-time
attribute the lowering wrote, else the static dim 3 of ``attention_weights`` from ONNX shape
inference. Every other size is read from tensors at run time, so the graph stays valid for
dynamic image sizes. GridSample needs opset 16 (its bilinear mode is named ``linear`` from opset
20 on).
"""
import itertools
from typing import List, Optional

import onnx
from onnx import helper, numpy_helper
import numpy as np

from mmdet_detrx.ops.ms_deform_attn_onnx import (GRID_SAMPLE_MIN_OPSET, NUM_LEVELS_ATTR,
                                                   grid_sample_decomposition)
from .msda_plugin import PLUGIN_DOMAIN, PLUGIN_OP_TYPE, is_plugin_node

__all__ = ['GRID_SAMPLE_MIN_OPSET', 'count_plugin_nodes', 'expand_msda_plugin_nodes']


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
    builder = _Builder(prefix)
    grid_sample_decomposition(builder, *node.input, num_levels=num_levels, opset=opset,
                              output_name=node.output[0])  # (B, Q, heads, C), as the plugin
    return builder


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
