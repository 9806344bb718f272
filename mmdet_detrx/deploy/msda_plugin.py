"""Multi-scale deformable attention as one ONNX node, TensorRT's MSDA plugin.

The plugin is ``MultiscaleDeformableAttnPlugin_TRT``.

TensorRT (8.6+, ``plugin/multiscaleDeformableAttnPlugin`` in NVIDIA/TensorRT) ships a plugin that
consumes exactly the inputs of our op, in this order and with no attributes::

    value               (B, S, heads, C)            float32 / float16
    spatial_shapes      (L, 2)   int32, rows (H_l, W_l)
    level_start_index   (L,)     int32
    sampling_locations  (B, Q, heads, L, P, 2)      normalised (x, y)
    attention_weights   (B, Q, heads, L, P)
    output              (B, Q, heads, C)            (4-D: reshaped to (B, Q, heads * C) after it)

TensorRT's ONNX parser hands any op type it has no importer for to the plugin registry, looked
up by the node's ``op_type`` (plugin version "1", empty plugin namespace, the defaults); it does
not read the node's domain. The node is put in the custom domain ``trt`` so that ``onnx.checker``
accepts an op that is not in the standard opset (NVIDIA TAO's Deformable DETR export does the
same, in domain ``TRT``). The two index inputs are cast to int32 in the graph because the plugin
accepts int32 only.

``torch.ops.detrx_deploy.ms_deform_attn_plugin`` is the op whose calls become plugin nodes: in
eager mode it computes ``mmdet_detrx.ops.ms_deform_attn``, and the TorchScript ONNX exporter
writes each call as one plugin node (``register_msda_plugin_symbolic``);
:mod:`.msda_export_mode` routes a model's attentions through it. The grid_sample export then
expands every plugin node into standard ONNX ops (:mod:`.msda_decomposition`), so ONNX Runtime
checks the very node wiring that TensorRT would consume.
"""
import torch
from torch import Tensor

from mmdet_detrx.ops import ms_deform_attn

__all__ = ['PLUGIN_DOMAIN', 'PLUGIN_OP_TYPE', 'is_plugin_node', 'register_msda_plugin_symbolic',
           'strip_plugin_attributes']

PLUGIN_DOMAIN = 'trt'
PLUGIN_OP_TYPE = 'MultiscaleDeformableAttnPlugin_TRT'
NUM_LEVELS_ATTR = 'detrx_num_levels'  # export-time only, see strip_plugin_attributes
_OP_NAME = 'detrx_deploy::ms_deform_attn_plugin'
_ONNX_INT32 = 6  # TensorProto.INT32


@torch.library.custom_op(_OP_NAME, mutates_args=())
def ms_deform_attn_plugin(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                          sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """``mmdet_detrx.ops.ms_deform_attn`` as an opaque op: (B, Q, heads * C)."""
    return ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                          attention_weights)


@ms_deform_attn_plugin.register_fake
def _ms_deform_attn_plugin_fake(value, spatial_shapes, level_start_index, sampling_locations,
                                attention_weights):
    batch, _, heads, channels = value.shape
    return value.new_empty((batch, sampling_locations.shape[1], heads * channels))


def _plugin_symbolic(g, value, spatial_shapes, level_start_index, sampling_locations,
                     attention_weights):
    from torch.onnx import symbolic_helper
    shapes32 = g.op('Cast', spatial_shapes, to_i=_ONNX_INT32)
    starts32 = g.op('Cast', level_start_index, to_i=_ONNX_INT32)
    value_sizes = symbolic_helper._get_tensor_sizes(value) or [None] * 4
    location_sizes = symbolic_helper._get_tensor_sizes(sampling_locations) or [None] * 6
    shape_sizes = symbolic_helper._get_tensor_sizes(spatial_shapes) or [None]
    num_levels = location_sizes[3] if location_sizes[3] is not None else shape_sizes[0]
    # The number of levels is static in every DETR (the graph unrolls its per-level loops); it
    # is kept on the node for the grid_sample expansion and removed from a trt-plugin export.
    attrs = {} if num_levels is None else {f'{NUM_LEVELS_ATTR}_i': int(num_levels)}
    output = g.op(f'{PLUGIN_DOMAIN}::{PLUGIN_OP_TYPE}', value, shapes32, starts32,
                  sampling_locations, attention_weights, **attrs)
    # (B, Q, heads, C): lets the exporter's shape inference continue past the custom node.
    output.setType(value.type().with_sizes(
        [value_sizes[0], location_sizes[1], value_sizes[2], value_sizes[3]]))
    # (B, Q, heads, C) -> (B, Q, heads * C), what the PyTorch op returns
    new_shape = g.op('Constant', value_t=torch.tensor([0, 0, -1], dtype=torch.int64))
    return g.op('Reshape', output, new_shape)


_registered_opsets = set()


def register_msda_plugin_symbolic(opset: int) -> None:
    """Tell the TorchScript ONNX exporter to write the plugin node for our op at ``opset``."""
    if opset not in _registered_opsets:
        torch.onnx.register_custom_op_symbolic(_OP_NAME, _plugin_symbolic, opset)
        _registered_opsets.add(opset)


def is_plugin_node(node) -> bool:
    return node.op_type == PLUGIN_OP_TYPE and node.domain == PLUGIN_DOMAIN


def strip_plugin_attributes(model) -> None:
    """Remove the export-time attributes: TensorRT's plugin takes none (its creator has no
    fields), so the nodes are left exactly as the plugin expects."""
    for node in model.graph.node:
        if is_plugin_node(node):
            kept = [a for a in node.attribute if a.name != NUM_LEVELS_ATTR]
            del node.attribute[:]
            node.attribute.extend(kept)

