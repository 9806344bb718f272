"""mmcv's own deformable attention exports through our op without touching the caller's model.

``with_native_msda`` returns a copy in which each mmcv ``MultiScaleDeformableAttention`` is an
``MSDeformAttn`` holding the same parameters (no ``__class__`` swap, no attribute rebinding); the
op's own ONNX lowering then writes the graph.
"""
import onnx
import torch
from mmcv.ops import MultiScaleDeformableAttention
from torch import nn

from mmdet_detrx.deploy import (PLUGIN_OP_TYPE, msda_modules, onnxruntime_session,
                                with_native_msda)
from mmdet_detrx.models.layers import MSDeformAttn
from mmdet_detrx.ops import ms_deform_attn_onnx_lowering

SHAPES = [(6, 7), (3, 4)]


class Block(nn.Module):
    """One mmcv deformable attention between two linear layers."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.attn = MultiScaleDeformableAttention(embed_dims=16, num_heads=2, num_levels=2,
                                                  num_points=2, batch_first=True)
        torch.manual_seed(0)
        for p in self.parameters():  # mmcv zero-initialises the sampling offsets
            nn.init.normal_(p, std=0.3)
        self.eval()

    def forward(self, query, value, reference_points):
        spatial_shapes = torch.tensor(SHAPES)
        sizes = spatial_shapes.prod(1)
        level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
        return self.attn(self.proj(query), value=value, reference_points=reference_points,
                         spatial_shapes=spatial_shapes, level_start_index=level_start_index)


def _inputs():
    generator = torch.Generator().manual_seed(1)
    tokens = sum(h * w for h, w in SHAPES)
    return (torch.randn(1, 5, 16, generator=generator),
            torch.randn(1, tokens, 16, generator=generator),
            torch.rand(1, 5, 2, 2, generator=generator))


def test_copy_computes_mmcv_module_with_our_op_and_leaves_the_model_alone():
    model = Block()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    native = with_native_msda(model)
    assert native is not model
    assert type(model.attn) is MultiScaleDeformableAttention  # the caller's model: untouched
    assert type(native.attn) is MSDeformAttn
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert native.state_dict().keys() == model.state_dict().keys()
    assert len(msda_modules(native)) == 1
    with torch.no_grad():
        torch.testing.assert_close(native(*_inputs()), model(*_inputs()), atol=1e-5, rtol=1e-5)
    assert with_native_msda(native) is native  # nothing to replace: no copy


def test_mmcv_module_exports_as_either_lowering(tmp_path):
    model = with_native_msda(Block())
    for lowering in ('grid_sample', 'trt-plugin'):
        path = str(tmp_path / f'{lowering}.onnx')
        with ms_deform_attn_onnx_lowering(lowering), torch.no_grad():
            torch.onnx.export(model, _inputs(), path, dynamo=False, opset_version=17,
                              input_names=['query', 'value', 'reference_points'],
                              output_names=['output'])
        op_types = [n.op_type for n in onnx.load(path).graph.node]
        assert (PLUGIN_OP_TYPE in op_types) == (lowering == 'trt-plugin')
        assert op_types.count('GridSample') == (2 if lowering == 'grid_sample' else 0)
    session = onnxruntime_session(str(tmp_path / 'grid_sample.onnx'))
    query, value, reference_points = _inputs()
    (actual, ) = session.run(None, {'query': query.numpy(), 'value': value.numpy(),
                                    'reference_points': reference_points.numpy()})
    with torch.no_grad():
        expected = model(query, value, reference_points)
    torch.testing.assert_close(torch.from_numpy(actual), expected, atol=1e-5, rtol=1e-5)
