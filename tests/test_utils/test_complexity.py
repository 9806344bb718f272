"""mmengine's FlopAnalyzer (behind mmdet's get_flops and ours) counts our deformable attention op
once `mmdet_detrx` is imported: 5 MACs per (batch, query, head, level, point, channel)."""
import pytest
import torch
from mmengine.analysis import FlopAnalyzer

import mmdet_detrx  # noqa: F401  (registers the FLOP handle)
from mmdet_detrx.models.layers import MSDeformAttn
from mmdet_detrx.ops import ms_deform_attn, native_available
from mmdet_detrx.utils.complexity import MS_DEFORM_ATTN_OP

pytestmark = pytest.mark.skipif(not native_available(), reason='native extension not built')

B, HEADS, C, Q, P = 2, 4, 8, 7, 3
SHAPES = ((6, 5), (3, 3))


class CoreOp(torch.nn.Module):
    def forward(self, value, spatial_shapes, level_start_index, locations, weights):
        return ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)


def op_inputs():
    shapes = torch.tensor(SHAPES, dtype=torch.int64)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    num_value = int(shapes.prod(1).sum())
    value = torch.randn(B, num_value, HEADS, C)
    locations = torch.rand(B, Q, HEADS, len(SHAPES), P, 2)
    weights = torch.rand(B, Q, HEADS, len(SHAPES), P).softmax(-1)
    return value, shapes, starts, locations, weights


def test_op_is_counted_from_its_shapes():
    analyzer = FlopAnalyzer(CoreOp(), op_inputs())
    assert analyzer.total() == 5 * B * Q * HEADS * len(SHAPES) * P * C
    assert MS_DEFORM_ATTN_OP not in analyzer.unsupported_ops()
    assert analyzer.by_operator() == {'ms_deform_attn': analyzer.total()}


def test_layer_counts_op_plus_projections():
    embed_dims, num_levels, num_points = HEADS * C, len(SHAPES), P
    layer = MSDeformAttn(embed_dims=embed_dims, num_heads=HEADS, num_levels=num_levels,
                         num_points=num_points, batch_first=True).eval()
    value, shapes, starts, _, _ = op_inputs()
    num_value = value.shape[1]
    query = torch.randn(B, Q, embed_dims)
    reference_points = torch.rand(B, Q, num_levels, 2)
    feats = torch.randn(B, num_value, embed_dims)

    class Call(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, query, feats, reference_points):
            return self.layer(query, value=feats, reference_points=reference_points,
                              spatial_shapes=shapes, level_start_index=starts)

    analyzer = FlopAnalyzer(Call(), (query, feats, reference_points))
    by_op = analyzer.by_operator()
    assert by_op['ms_deform_attn'] == 5 * B * Q * HEADS * num_levels * num_points * C
    linears = (B * num_value * embed_dims * embed_dims  # value_proj
               + B * Q * embed_dims * HEADS * num_levels * num_points * 2  # sampling_offsets
               + B * Q * embed_dims * HEADS * num_levels * num_points  # attention_weights
               + B * Q * embed_dims * embed_dims)  # output_proj
    assert by_op['linear'] == linears
    assert MS_DEFORM_ATTN_OP not in analyzer.unsupported_ops()


def test_activations_are_the_output_elements():
    from mmengine.analysis import ActivationAnalyzer
    analyzer = ActivationAnalyzer(CoreOp(), op_inputs())
    assert analyzer.total() == B * Q * HEADS * C
    assert MS_DEFORM_ATTN_OP not in analyzer.unsupported_ops()
