"""The op's ONNX lowerings equal ``ms_deform_attn_pytorch``.

One attention core (``ms_deform_attn``, the native op) is exported with every input a graph input
(spatial shapes too): with the ``'grid_sample'`` lowering directly, and with the ``'trt-plugin'``
lowering as TensorRT's plugin node, which is then expanded into standard ops. Both run in ONNX
Runtime with level sizes other than the traced ones, including sampling locations outside the
map (zero padding).
"""
import onnx
import pytest
import torch
from torch import nn

from mmdet_detrx.deploy import (PLUGIN_DOMAIN, PLUGIN_OP_TYPE, count_plugin_nodes,
                                expand_msda_plugin_nodes, onnxruntime_session)
from mmdet_detrx.ops import (ms_deform_attn, ms_deform_attn_onnx_lowering,
                             ms_deform_attn_pytorch)

NAMES = ['value', 'spatial_shapes', 'level_start_index', 'sampling_locations',
         'attention_weights']


class Core(nn.Module):
    def forward(self, value, spatial_shapes, level_start_index, locations, weights):
        return ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)


def _inputs(shapes, batch=2, queries=7, heads=2, channels=3, points=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    sizes = spatial_shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    levels = len(shapes)
    value = torch.randn(batch, int(sizes.sum()), heads, channels, generator=gen)
    # [-0.2, 1.2]: some points fall outside the map, where grid_sample pads with zeros
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=gen) * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, levels, points, generator=gen).softmax(-1)
    return value, spatial_shapes, starts, locations, weights


def _export(path, opset, lowering='trt-plugin'):
    dynamic = {'value': {0: 'B', 1: 'S'}, 'sampling_locations': {0: 'B', 1: 'Q'},
               'attention_weights': {0: 'B', 1: 'Q'}, 'output': {0: 'B', 1: 'Q'}}
    with ms_deform_attn_onnx_lowering(lowering):
        torch.onnx.export(Core(), _inputs([(4, 5), (2, 3)]), path, dynamo=False,
                          opset_version=opset, input_names=NAMES, output_names=['output'],
                          dynamic_axes=dynamic)
    return onnx.load(path)


@pytest.mark.parametrize('opset', [16, 20])
def test_expanded_plugin_equals_pytorch_reference_at_other_sizes(opset, tmp_path):
    model = _export(str(tmp_path / 'core.onnx'), opset)
    (plugin, ) = [n for n in model.graph.node if n.op_type == PLUGIN_OP_TYPE]
    assert plugin.domain == PLUGIN_DOMAIN
    assert expand_msda_plugin_nodes(model) == 1
    assert count_plugin_nodes(model) == 0
    assert sum(n.op_type == 'GridSample' for n in model.graph.node) == 2  # one per level
    onnx.checker.check_model(model)
    path = str(tmp_path / 'expanded.onnx')
    onnx.save(model, path)
    session = onnxruntime_session(path)
    for shapes, batch, queries in [([(4, 5), (2, 3)], 2, 7), ([(9, 6), (1, 4)], 1, 11)]:
        inputs = _inputs(shapes, batch=batch, queries=queries, seed=queries)
        expected = ms_deform_attn_pytorch(inputs[0], inputs[1], inputs[3], inputs[4])
        (actual, ) = session.run(None, {n: t.numpy() for n, t in zip(NAMES, inputs)})
        torch.testing.assert_close(torch.from_numpy(actual), expected, atol=1e-5, rtol=1e-5)


def _check_at_other_sizes(path):
    session = onnxruntime_session(path)
    for shapes, batch, queries in [([(4, 5), (2, 3)], 2, 7), ([(9, 6), (1, 4)], 1, 11)]:
        inputs = _inputs(shapes, batch=batch, queries=queries, seed=queries)
        expected = ms_deform_attn_pytorch(inputs[0], inputs[1], inputs[3], inputs[4])
        (actual, ) = session.run(None, {n: t.numpy() for n, t in zip(NAMES, inputs)})
        torch.testing.assert_close(torch.from_numpy(actual), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('opset', [16, 20])
def test_grid_sample_lowering_equals_pytorch_reference_at_other_sizes(opset, tmp_path):
    """The default lowering: the native op exports as standard ops, no custom node."""
    path = str(tmp_path / 'core.onnx')
    model = _export(path, opset, lowering='grid_sample')
    assert count_plugin_nodes(model) == 0
    assert {n.domain for n in model.graph.node} <= {'', 'ai.onnx'}
    assert sum(n.op_type == 'GridSample' for n in model.graph.node) == 2  # one per level
    onnx.checker.check_model(model)
    _check_at_other_sizes(path)


def test_default_lowering_is_grid_sample(tmp_path):
    path = str(tmp_path / 'core.onnx')
    torch.onnx.export(Core(), _inputs([(4, 5), (2, 3)]), path, dynamo=False, opset_version=17,
                      input_names=NAMES, output_names=['output'])
    model = onnx.load(path)
    assert count_plugin_nodes(model) == 0
    assert sum(n.op_type == 'GridSample' for n in model.graph.node) == 2


def test_grid_sample_lowering_refuses_an_old_opset(tmp_path):
    with pytest.raises(Exception, match=r'opset >= 16 \(GridSample\).*opset 13'):
        _export(str(tmp_path / 'core.onnx'), 13, lowering='grid_sample')


def test_unknown_lowering_is_named():
    with pytest.raises(ValueError, match="one of \\('grid_sample', 'trt-plugin'\\)"):
        with ms_deform_attn_onnx_lowering('tensorrt'):
            pass


def test_expansion_refuses_an_opset_without_grid_sample(tmp_path):
    model = _export(str(tmp_path / 'core.onnx'), 13)
    with pytest.raises(ValueError, match=r'opset >= 16 \(GridSample\).*opset 13'):
        expand_msda_plugin_nodes(model)
