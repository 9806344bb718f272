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


# --- One registry of FLOP formulas (issue 28.4): every counter of ours counts every op ---------

SDPA_SHAPES = dict(q=(B, HEADS, 11, C), k=(B, HEADS, 13, C), v=(B, HEADS, 13, 2 * C))


class SdpaAndMsda(torch.nn.Module):
    """One scaled dot-product attention and one deformable attention op, nothing else counted."""

    def forward(self, q, k, v, value, spatial_shapes, level_start_index, locations, weights):
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        sampled = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
        return attended, sampled


def sdpa_msda_inputs():
    g = torch.Generator().manual_seed(0)
    return (*(torch.randn(shape, generator=g) for shape in SDPA_SHAPES.values()), *op_inputs())


def expected_macs():
    from mmdet_detrx.utils.complexity import sdpa_macs
    msda = 5 * B * Q * HEADS * len(SHAPES) * P * C
    sdpa = B * HEADS * 11 * 13 * (C + 2 * C)
    assert sdpa_macs(*SDPA_SHAPES.values()) == sdpa
    return dict(scaled_dot_product_attention=sdpa, ms_deform_attn=msda)


def test_mmengine_analyzer_counts_sdpa_and_msda():
    """mmengine's FlopAnalyzer: what mmdet's get_flops and ours use."""
    analyzer = FlopAnalyzer(SdpaAndMsda(), sdpa_msda_inputs())
    assert dict(analyzer.by_operator()) == expected_macs()
    assert not analyzer.unsupported_ops()


def test_benchmark_backbones_counts_sdpa_and_msda():
    from mmdet_detrx.tools.analysis import benchmark_backbones

    class Packed(SdpaAndMsda):  # count_flops passes one input
        def forward(self, x):
            return super().forward(*inputs)

    inputs = sdpa_msda_inputs()
    assert benchmark_backbones.count_flops(Packed(), torch.zeros(1)) == \
        sum(expected_macs().values())


def test_benchmark_detectors_flop_counter_counts_sdpa_and_msda():
    """torch's FlopCounterMode (2 FLOPs per MAC), which lacks both ops, gets our formulas."""
    from mmdet_detrx.tools.analysis import benchmark_detectors
    inputs = sdpa_msda_inputs()
    module = SdpaAndMsda()
    flops, encoder = benchmark_detectors.count_flops_and_capture(lambda: module(*inputs), module)
    assert flops == 2 * sum(expected_macs().values()) and encoder is None
    # Training: the CPU SDPA backward with torch's formula (2.5x the forward for d_qk = d_v).
    from mmdet_detrx.utils.complexity import flop_counter_mode
    q, k, v = (torch.randn(B, HEADS, 11, C, requires_grad=True) for _ in range(3))
    with flop_counter_mode(display=False) as counter:
        torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()
    forward = 2 * B * HEADS * 11 * 11 * 2 * C
    assert counter.get_total_flops() == forward + forward * 5 // 2


def test_act_flops_are_counted_from_the_record():
    """get_flops and act_tradeoff count ACT layers from their forwards' records."""
    from mmdet_detrx.models.layers import AdaptiveClusteringAttention, act_exact_mode
    from mmdet_detrx.tools.analysis.act_tradeoff import EncoderMeter
    from mmdet_detrx.utils.complexity import act_flops
    torch.manual_seed(0)
    act = AdaptiveClusteringAttention(32, 4, batch_first=True, bucket_width=1.0).eval()
    model = torch.nn.ModuleDict(dict(encoder=torch.nn.ModuleList([act])))
    x = torch.randn(2, 10, 32)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[1, 6:] = True
    records = []
    act.register_record_hook(lambda layer, record: records.append(record))
    meter = EncoderMeter(model)
    with torch.no_grad():
        act(x, key_padding_mask=mask)
        with act_exact_mode(model):
            act(x, key_padding_mask=mask)
    meter.remove()
    clustered, exact = records
    n = torch.tensor([10., 6.], dtype=torch.float64)
    e, d, heads = 32., 8., 4
    sum_c = clustered.num_clusters.double().sum(dim=1)
    assert torch.equal(act_flops(exact, 32), 4 * n * e * e + 2 * n * n * e)
    assert torch.equal(act_flops(clustered, 32),
                       4 * n * e * e + n * 32 * e + n * e + 2 * n * d * sum_c)
    assert clustered.num_clusters.shape == (2, heads) and (sum_c <= n * heads).all()
    assert meter.flops == pytest.approx(float(act_flops(clustered, 32).sum())
                                        + float(act_flops(exact, 32).sum()))
    assert meter.images == 4 and meter.cluster_count == 2 * heads


def test_flop_counter_counts_packed_linear_as_nn_linear():
    """Our packed linear layers run ``mkldnn::_linear_pointwise`` in inference, which torch's
    FlopCounterMode lacks: counted as ``aten::addmm`` counts nn.Linear (2 x rows x in x out)."""
    import copy

    from mmdet_detrx.models.detectors import pack_linears, packed_linear
    from mmdet_detrx.utils.complexity import flop_counter_mode
    plain = torch.nn.Linear(32, 24)
    packed = copy.deepcopy(plain)
    pack_linears(packed)
    x = torch.randn(2, packed_linear.MIN_ROWS, 32)  # 3-D: rows are all but the last dim
    counts = []
    for layer in (plain, packed):
        with torch.no_grad(), flop_counter_mode(display=False) as counter:
            layer(x)
        counts.append(counter.get_flop_counts()['Global'])
    assert list(counts[1]) == [torch.ops.mkldnn._linear_pointwise]  # oneDNN ran
    assert sum(counts[1].values()) == sum(counts[0].values()) == 2 * x.numel() * 24
