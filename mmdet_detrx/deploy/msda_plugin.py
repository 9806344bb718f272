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

The node is written by the op's own ONNX lowering
(:mod:`mmdet_detrx.ops.ms_deform_attn_onnx`, inside
``ms_deform_attn_onnx_lowering('trt-plugin')``): ``detrx::ms_deform_attn_forward`` becomes one
node in the custom domain ``trt`` (so that ``onnx.checker`` accepts it; TensorRT's parser looks
plugins up by ``op_type`` only), with the two index inputs cast to int32 in the graph because the
plugin accepts int32 only. This module holds the helpers for such graphs.
"""
from mmdet_detrx.ops.ms_deform_attn_onnx import NUM_LEVELS_ATTR, PLUGIN_DOMAIN, PLUGIN_OP_TYPE

__all__ = ['PLUGIN_DOMAIN', 'PLUGIN_OP_TYPE', 'is_plugin_node', 'strip_plugin_attributes']


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
