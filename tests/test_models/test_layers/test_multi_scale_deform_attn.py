"""MSDeformAttn: a drop-in for mmcv's MultiScaleDeformableAttention: same weights, same output."""
import pytest
import torch
from mmcv.ops import MultiScaleDeformableAttention
from mmdet.registry import MODELS

from mmdet_detrx.models.layers import MSDeformAttn
from mmdet_detrx.models.layers import multi_scale_deform_attn as layer_module
from mmdet_detrx.ops import ms_deform_attn

EMBED_DIMS, NUM_HEADS, NUM_LEVELS, NUM_POINTS = 32, 4, 3, 2
SPATIAL_SHAPES = torch.tensor([[6, 8], [3, 5], [2, 2]])  # (H, W); non-square on purpose
LEVEL_START_INDEX = torch.cat([SPATIAL_SHAPES.new_zeros(1),
                               SPATIAL_SHAPES.prod(1).cumsum(0)[:-1]])
NUM_VALUES = int(SPATIAL_SHAPES.prod(1).sum())
BATCH, NUM_QUERIES = 2, 5


def _randomize(module):
    # mmcv zero-initialises sampling_offsets.weight and attention_weights: make every
    # parameter matter so a wrong formula cannot hide behind the init.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return module


def _pair(batch_first=True, **kwargs):
    cfg = dict(embed_dims=EMBED_DIMS, num_heads=NUM_HEADS, num_levels=NUM_LEVELS,
               num_points=NUM_POINTS, dropout=0.0, batch_first=batch_first, **kwargs)
    ours = _randomize(MSDeformAttn(**cfg)).eval()
    ref = MultiScaleDeformableAttention(**cfg).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def _inputs(ref_dim, batch_first=True, with_mask=False, seed=1):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(BATCH, NUM_QUERIES, EMBED_DIMS, generator=gen)
    value = torch.randn(BATCH, NUM_VALUES, EMBED_DIMS, generator=gen)
    query_pos = torch.randn(BATCH, NUM_QUERIES, EMBED_DIMS, generator=gen)
    reference_points = torch.rand(BATCH, NUM_QUERIES, NUM_LEVELS, ref_dim, generator=gen)
    if ref_dim == 4:  # boxes of 10-60% of the image
        reference_points[..., 2:] = reference_points[..., 2:] * 0.5 + 0.1
    key_padding_mask = None
    if with_mask:
        key_padding_mask = torch.rand(BATCH, NUM_VALUES, generator=gen) < 0.3
    if not batch_first:
        query, value, query_pos = (t.transpose(0, 1) for t in (query, value, query_pos))
    return dict(query=query, value=value, query_pos=query_pos,
                reference_points=reference_points, key_padding_mask=key_padding_mask,
                spatial_shapes=SPATIAL_SHAPES, level_start_index=LEVEL_START_INDEX)


def test_registered_and_drop_in():
    attn = MODELS.build(dict(type='MSDeformAttn', embed_dims=EMBED_DIMS, num_levels=NUM_LEVELS))
    assert isinstance(attn, MultiScaleDeformableAttention)
    ref = MultiScaleDeformableAttention(embed_dims=EMBED_DIMS, num_levels=NUM_LEVELS)
    assert list(attn.state_dict()) == list(ref.state_dict())
    attn.load_state_dict(ref.state_dict(), strict=True)  # mmcv -> ours
    ref.load_state_dict(attn.state_dict(), strict=True)  # ours -> mmcv


@pytest.mark.parametrize('batch_first', [True, False])
@pytest.mark.parametrize('with_mask', [False, True])
@pytest.mark.parametrize('ref_dim', [2, 4])
def test_matches_mmcv(ref_dim, with_mask, batch_first):
    ours, ref = _pair(batch_first=batch_first)
    inputs = _inputs(ref_dim, batch_first=batch_first, with_mask=with_mask)
    with torch.no_grad():
        expected = ref(**inputs)
        actual = ours(**inputs)
    assert actual.shape == expected.shape == inputs['query'].shape
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_encoder_self_attention_defaults_like_mmcv():
    # Encoder use: value is None (the query itself, before query_pos), identity given.
    ours, ref = _pair()
    inputs = _inputs(2)
    inputs['query'] = inputs.pop('value')  # one query per value token
    inputs['query_pos'] = torch.randn_like(inputs['query'])
    inputs['identity'] = torch.randn_like(inputs['query'])
    inputs['reference_points'] = torch.rand(BATCH, NUM_VALUES, NUM_LEVELS, 2)
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs), ref(**inputs), atol=1e-5, rtol=1e-5)


def test_padding_is_ignored():
    ours, _ = _pair()
    inputs = _inputs(2, with_mask=True)
    mask = inputs['key_padding_mask']
    changed = dict(inputs, value=inputs['value'] + 100.0 * mask[..., None])
    with torch.no_grad():
        torch.testing.assert_close(ours(**changed), ours(**inputs))


def test_sampling_points_are_normalised_pixel_offsets():
    ours, _ = _pair()
    query = torch.randn(BATCH, NUM_QUERIES, EMBED_DIMS)
    reference_points = torch.rand(BATCH, NUM_QUERIES, NUM_LEVELS, 2)
    locations, weights = ours.sampling_points(query, reference_points, SPATIAL_SHAPES)
    assert locations.shape == (BATCH, NUM_QUERIES, NUM_HEADS, NUM_LEVELS, NUM_POINTS, 2)
    assert weights.shape == (BATCH, NUM_QUERIES, NUM_HEADS, NUM_LEVELS, NUM_POINTS)
    torch.testing.assert_close(weights.sum((-1, -2)), torch.ones(BATCH, NUM_QUERIES, NUM_HEADS))
    # Offset in pixels of level l == (location - reference) * (W_l, H_l) == linear output.
    offsets = ours.sampling_offsets(query).view(*locations.shape)
    pixels = (locations - reference_points[:, :, None, :, None]) * SPATIAL_SHAPES.flip(-1)[:, None]
    torch.testing.assert_close(pixels, offsets, atol=1e-5, rtol=1e-5)


def test_reference_points_broadcast_over_levels_like_mmcv():
    # mmcv adds reference_points[:, :, None, :, None] by broadcasting, so (B, Q, 1, 2) works there.
    ours, _ = _pair()
    query = torch.randn(BATCH, NUM_QUERIES, EMBED_DIMS)
    one_level = torch.rand(BATCH, NUM_QUERIES, 1, 2)
    locations, _ = ours.sampling_points(query, one_level, SPATIAL_SHAPES)
    expected, _ = ours.sampling_points(query, one_level.expand(-1, -1, NUM_LEVELS, -1),
                                       SPATIAL_SHAPES)
    torch.testing.assert_close(locations, expected, atol=0, rtol=0)


def test_gradients_match_mmcv():
    ours, ref = _pair()
    inputs = _inputs(4, with_mask=True)
    grads = []
    for module in (ours, ref):
        query = inputs['query'].clone().requires_grad_()
        value = inputs['value'].clone().requires_grad_()
        module.zero_grad()
        module(**dict(inputs, query=query, value=value)).square().sum().backward()
        grads.append([query.grad, value.grad] + [p.grad for p in module.parameters()])
    for actual, expected in zip(*grads):
        assert actual is not None and actual.abs().sum() > 0
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def _record_op_dtypes(monkeypatch):
    """Patches the op as the layer calls it; returns the list of its input dtypes per call."""
    calls = []

    def recording(value, spatial_shapes, level_start_index, locations, weights, *args):
        calls.append((value.dtype, locations.dtype, weights.dtype))
        return ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights,
                              *args)

    monkeypatch.setattr(layer_module, 'ms_deform_attn', recording)
    return calls


@pytest.mark.parametrize('ref_dim', [2, 4])
def test_bf16_autocast_cpu_runs_the_op_in_mixed_precision(ref_dim, monkeypatch):
    ours, _ = _pair()
    inputs = _inputs(ref_dim, with_mask=True)
    calls = _record_op_dtypes(monkeypatch)
    with torch.no_grad():
        expected = ours(**inputs)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            actual = ours(**inputs)
    # bfloat16 values (value_proj ran in bf16), float32 locations and weights: no upcast of
    # value anywhere, so the kernel's bf16 gathers are what runs.
    assert calls == [(torch.float32, ) * 3,
                     (torch.bfloat16, torch.float32, torch.float32)]
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual.float(), expected, atol=0.1, rtol=0.05)


def test_bf16_autocast_training_step_matches_fp32():
    ours, _ = _pair()
    inputs = _inputs(4, with_mask=True)
    grads = []
    for autocast in (False, True):
        ours.zero_grad()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            loss = ours(**inputs).float().square().mean()
        loss.backward()
        grads.append({name: p.grad.clone() for name, p in ours.named_parameters()})
    for name, grad in grads[1].items():
        scale = grads[0][name].abs().max().item()
        torch.testing.assert_close(grad, grads[0][name], rtol=0.05, atol=0.05 * scale,
                                   msg=lambda m, n=name: f'{n}: {m}')


def test_half_model_with_float32_reference_points(monkeypatch):
    # mmdet computes reference points in float32: a float16 module then gets float32 locations,
    # and the op runs float16 values at float32 locations and weights.
    ours, _ = _pair()
    inputs = _inputs(2)
    calls = _record_op_dtypes(monkeypatch)
    with torch.no_grad():
        expected = ours(**inputs)
        half = {k: v.half() if torch.is_tensor(v) and v.is_floating_point() else v
                for k, v in inputs.items()}
        half['reference_points'] = inputs['reference_points']
        actual = ours.half()(**half)
    assert calls[-1] == (torch.float16, torch.float32, torch.float32)
    assert actual.dtype == torch.float16
    torch.testing.assert_close(actual.float(), expected, atol=0.02, rtol=0.02)


def test_bf16_weights_and_inputs():
    # A model cast to bf16 entirely (no autocast): the op runs in bf16 (float32 arithmetic).
    ours, _ = _pair()
    inputs = _inputs(4, with_mask=True)
    with torch.no_grad():
        expected = ours(**inputs)
        half = {k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v
                for k, v in inputs.items()}
        actual = ours.bfloat16()(**half)
    assert actual.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), expected, atol=0.1, rtol=0.05)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
@pytest.mark.parametrize('ref_dim', [2, 4])
def test_cuda_matches_cpu(ref_dim):
    ours, _ = _pair()
    inputs = _inputs(ref_dim, with_mask=True)
    with torch.no_grad():
        expected = ours(**inputs)
        actual = ours.cuda()(**{k: v.cuda() if torch.is_tensor(v) else v
                                for k, v in inputs.items()})
    torch.testing.assert_close(actual.cpu(), expected, atol=1e-5, rtol=1e-5)


def test_rejects_bad_reference_points():
    ours, _ = _pair()
    inputs = _inputs(2)
    inputs['reference_points'] = torch.rand(BATCH, NUM_QUERIES, NUM_LEVELS, 3)
    with pytest.raises(ValueError, match='reference_points'):
        ours(**inputs)


def test_rejects_value_not_covering_levels():
    ours, _ = _pair()
    inputs = _inputs(2)
    inputs['value'] = inputs['value'][:, :-1]
    with pytest.raises(ValueError, match='spatial_shapes'):
        ours(**inputs)
