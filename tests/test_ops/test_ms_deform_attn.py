"""Native multi-scale deformable attention (``torch.ops.detrx``) vs the grid_sample reference.

The same tests run on every device with a native kernel (CPU always, CUDA when present).
"""
import importlib
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from mmdet_detrx.ops import (ms_deform_attn, ms_deform_attn_pytorch, native_available,
                             use_pytorch_ms_deform_attn)

pytestmark = pytest.mark.skipif(not native_available(),
                                reason='mmdet_detrx._C is not built')

DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() and native_available()
                     and torch._C._dispatch_has_kernel_for_dispatch_key(
                         'detrx::ms_deform_attn_forward', 'CUDA') else [])


def make_inputs(spatial_shapes=((6, 7), (3, 4), (1, 2)), batch=2, queries=5, heads=2,
                channels=8, points=3, dtype=torch.float64, device='cpu', low=-0.1, high=1.1,
                requires_grad=False, seed=0):
    """Random op inputs; locations uniform in [low, high] (outside [0, 1] on purpose)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(spatial_shapes, dtype=torch.int64).reshape(-1, 2)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    levels = shapes.shape[0]
    value = torch.randn(batch, int(sizes.sum()), heads, channels, generator=generator,
                        dtype=torch.float64)
    locations = low + (high - low) * torch.rand(batch, queries, heads, levels, points, 2,
                                                generator=generator, dtype=torch.float64)
    weights = torch.rand(batch, queries, heads, levels, points, generator=generator,
                         dtype=torch.float64)
    value, locations, weights = (t.to(device, dtype).requires_grad_(requires_grad)
                                 for t in (value, locations, weights))
    return value, shapes.to(device), starts.to(device), locations, weights


def run_both(value, shapes, starts, locations, weights, im2col_step=64):
    """Native and reference outputs plus gradients w.r.t. (value, locations, weights)."""
    results = []
    for use_reference in (False, True):
        inputs = [t.detach().requires_grad_() for t in (value, locations, weights)]
        if use_reference:
            out = ms_deform_attn_pytorch(inputs[0], shapes, inputs[1], inputs[2])
        else:
            out = ms_deform_attn(inputs[0], shapes, starts, inputs[1], inputs[2], im2col_step)
        grad_output = torch.linspace(-1, 1, out.numel(), dtype=out.dtype,
                                     device=out.device).reshape(out.shape)
        grads = torch.autograd.grad(out, inputs, grad_output, allow_unused=True)
        results.append((out.detach(), grads))
    return results


def assert_matches_reference(inputs, atol, rtol=0, im2col_step=64):
    (out, grads), (ref_out, ref_grads) = run_both(*inputs, im2col_step=im2col_step)
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    for name, grad, ref_grad in zip(('value', 'sampling_locations', 'attention_weights'), grads,
                                    ref_grads):
        torch.testing.assert_close(grad, ref_grad, atol=atol, rtol=rtol,
                                   msg=lambda m, name=name: f'grad of {name}: {m}')


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype,atol', [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_forward_backward_match_reference(device, dtype, atol):
    assert_matches_reference(make_inputs(dtype=dtype, device=device), atol=atol)


def test_matches_mmcv_reference():
    # Drop-in semantics: mmcv's own PyTorch reference gives the same numbers.
    mmcv_msda = pytest.importorskip('mmcv.ops.multi_scale_deform_attn')
    value, shapes, starts, locations, weights = make_inputs(low=-0.3, high=1.3)
    expected = mmcv_msda.multi_scale_deformable_attn_pytorch(value, shapes, locations, weights)
    torch.testing.assert_close(ms_deform_attn(value, shapes, starts, locations, weights),
                               expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('channels', [30, 32, 64, 71, 1025])
def test_gradcheck(device, channels):
    if channels > 100:  # keep the finite-difference Jacobian small
        kwargs = dict(spatial_shapes=((2, 3), ), batch=1, queries=1, heads=1, points=2)
    else:
        kwargs = dict(spatial_shapes=((3, 4), (1, 2)), batch=1, queries=2, heads=2, points=2)
    value, shapes, starts, locations, weights = make_inputs(
        channels=channels, device=device, requires_grad=True, **kwargs)

    def op(value, locations, weights):
        return ms_deform_attn(value, shapes, starts, locations, weights)

    # fast_mode checks random projections of the Jacobian: 1025 channels stay quick.
    assert torch.autograd.gradcheck(op, (value, locations, weights), eps=1e-6, atol=1e-6,
                                    fast_mode=channels > 100)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_low_precision_matches_float32(device, dtype):
    # Same rounded inputs in both runs: only the kernel arithmetic differs (fp32 accumulation).
    inputs = make_inputs(channels=40, points=4, dtype=dtype, device=device, low=0, high=1)
    value, shapes, starts, locations, weights = inputs
    (out, grads), _ = run_both(*inputs)
    (out32, grads32), _ = run_both(value.float(), shapes, starts, locations.float(),
                                   weights.float())
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    tol = dict(atol=5e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-2, rtol=5e-3)
    torch.testing.assert_close(out.float(), out32, **tol)
    # grad_value and grad_attention_weights are sums of products: fp32 accumulation keeps them
    # close; location gradients scale with W, H so compare them relative to their magnitude.
    torch.testing.assert_close(grads[0].float(), grads32[0], **tol)
    torch.testing.assert_close(grads[2].float(), grads32[2], **tol)
    scale = grads32[1].abs().max()
    assert (grads[1].float() - grads32[1]).abs().max() <= 2e-2 * scale


@pytest.mark.parametrize('device', DEVICES)
def test_batch_not_divisible_by_im2col_step(device):
    inputs = make_inputs(batch=3, device=device)
    assert_matches_reference(inputs, atol=1e-10, im2col_step=2)


@pytest.mark.parametrize('device', DEVICES)
def test_points_outside_the_map(device):
    # Partly and fully outside: zero padding, exactly like grid_sample.
    inputs = make_inputs(device=device, low=-1.5, high=2.5, points=8)
    assert_matches_reference(inputs, atol=1e-10)


@pytest.mark.parametrize('device', DEVICES)
def test_fully_outside_points_give_zero(device):
    value, shapes, starts, locations, weights = make_inputs(device=device, low=2, high=3,
                                                            requires_grad=True)
    out = ms_deform_attn(value, shapes, starts, locations, weights)
    out.sum().backward()
    assert torch.count_nonzero(out) == 0
    for tensor in (value, locations, weights):
        assert torch.count_nonzero(tensor.grad) == 0


@pytest.mark.parametrize('device', DEVICES)
def test_single_pixel_level(device):
    inputs = make_inputs(spatial_shapes=((1, 1), (2, 3)), device=device, low=-0.6, high=1.6)
    assert_matches_reference(inputs, atol=1e-10)


@pytest.mark.parametrize('device', DEVICES)
def test_zero_attention_weights(device):
    value, shapes, starts, locations, weights = make_inputs(device=device)
    weights = torch.zeros_like(weights)
    assert_matches_reference((value, shapes, starts, locations, weights), atol=1e-10)
    (out, (grad_value, grad_locations, grad_weights)), _ = run_both(value, shapes, starts,
                                                                    locations, weights)
    assert torch.count_nonzero(out) == 0
    assert torch.count_nonzero(grad_value) == 0 and torch.count_nonzero(grad_locations) == 0
    assert torch.count_nonzero(grad_weights) > 0  # still d out / d weight = sampled value


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('batch,queries', [(0, 5), (2, 0)])
def test_empty_inputs(device, batch, queries):
    value, shapes, starts, locations, weights = make_inputs(batch=batch, queries=queries,
                                                            device=device, requires_grad=True)
    out = ms_deform_attn(value, shapes, starts, locations, weights)
    assert out.shape == (batch, queries, 2 * 8)
    out.sum().backward()
    assert value.grad.shape == value.shape and torch.count_nonzero(value.grad) == 0
    assert locations.grad.shape == locations.shape
    assert weights.grad.shape == weights.shape


@pytest.mark.parametrize('device', DEVICES)
def test_non_contiguous_inputs(device):
    value, shapes, starts, locations, weights = make_inputs(device=device)
    # Same values, other memory layouts: a transposed copy and every-other-element views.
    value_nc = value.transpose(1, 2).contiguous().transpose(1, 2)
    locations_nc, weights_nc, shapes_nc = (torch.stack([t, torch.zeros_like(t)], -1)[..., 0]
                                           for t in (locations, weights, shapes))
    assert not any(t.is_contiguous() for t in (value_nc, locations_nc, weights_nc, shapes_nc))
    inputs = (value_nc, shapes_nc, starts, locations_nc, weights_nc)
    assert_matches_reference(inputs, atol=1e-10)
    (out, grads), _ = run_both(value, shapes, starts, locations, weights)
    (out_nc, grads_nc), _ = run_both(*inputs)
    assert torch.equal(out, out_nc)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_nc))


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('batch,heads', [(2, 4), (1, 1)])
def test_backward_is_deterministic(device, batch, heads):
    # Many queries hitting the same few pixels: any racy accumulation would show. With a single
    # (batch, head) pair the CPU kernel splits the work per level instead.
    inputs = make_inputs(spatial_shapes=((4, 4), (2, 2)), batch=batch, queries=300, heads=heads,
                         channels=32, points=4, dtype=torch.float32, device=device)
    _, first = run_both(*inputs)[0]
    _, second = run_both(*inputs)[0]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    if device == 'cpu':  # and independent of the thread count
        threads = torch.get_num_threads()
        results = []
        try:
            for num_threads in (1, 2):
                torch.set_num_threads(num_threads)
                results.append(run_both(*inputs)[0][1])
        finally:
            torch.set_num_threads(threads)
        for result in results:
            assert all(torch.equal(a, b) for a, b in zip(first, result))


def test_cpu_backward_runs_in_deterministic_mode():
    """The CPU backward has no atomics (bitwise reproducible, see above): unlike the CUDA one it
    raises no non-determinism alert under torch.use_deterministic_algorithms(True)."""
    inputs = make_inputs(dtype=torch.float32)
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            _, first = run_both(*inputs)[0]
            _, second = run_both(*inputs)[0]
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize('device', DEVICES)
def test_double_backward_raises(device):
    value, shapes, starts, locations, weights = make_inputs(device=device, requires_grad=True)
    out = ms_deform_attn(value, shapes, starts, locations, weights)
    (grad_locations, ) = torch.autograd.grad(out.square().sum(), locations, create_graph=True)
    with pytest.raises(RuntimeError, match='double backward'):
        grad_locations.sum().backward()
    # The PyTorch path supports it.
    with use_pytorch_ms_deform_attn():
        out = ms_deform_attn(value, shapes, starts, locations, weights)
    (grad_locations, ) = torch.autograd.grad(out.square().sum(), locations, create_graph=True)
    grad_locations.sum().backward()
    assert value.grad is not None


class RecordOps(TorchDispatchMode):
    """Records the name of every op that reaches the dispatcher."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('use_pytorch', [False, True])
def test_pytorch_switch_selects_implementation(use_pytorch, monkeypatch):
    inputs = make_inputs(dtype=torch.float32)
    with RecordOps() as recorder, use_pytorch_ms_deform_attn(use_pytorch):
        out = ms_deform_attn(*inputs)
    native_called = 'detrx.ms_deform_attn_forward.default' in recorder.ops
    assert native_called != use_pytorch
    assert any('grid_sampler' in op for op in recorder.ops) == use_pytorch
    torch.testing.assert_close(out, ms_deform_attn_pytorch(*inputs[:2], *inputs[3:]),
                               atol=1e-5, rtol=0)
    # The environment variable does the same.
    monkeypatch.setenv('MMDET_DETRX_MSDA_PYTORCH', '1')
    with RecordOps() as recorder:
        ms_deform_attn(*inputs)
    assert 'detrx.ms_deform_attn_forward.default' not in recorder.ops


def test_fallback_without_native_kernel_warns_once(monkeypatch):
    # The submodule, not the function that `mmdet_detrx.ops` re-exports under the same name.
    module = importlib.import_module('mmdet_detrx.ops.ms_deform_attn')
    monkeypatch.setattr(module, '_has_native_kernel', lambda device_type: False)
    monkeypatch.setattr(module, '_warned_fallback', set())
    inputs = make_inputs()
    with pytest.warns(UserWarning, match='PyTorch implementation on cpu'):
        out = ms_deform_attn(*inputs)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        ms_deform_attn(*inputs)  # second call: no warning
    torch.testing.assert_close(out, ms_deform_attn_pytorch(*inputs[:2], *inputs[3:]))


def test_meta_tensors_give_shapes():
    value, shapes, starts, locations, weights = make_inputs(device='meta')
    out = ms_deform_attn(value, shapes, starts, locations, weights)
    assert out.device.type == 'meta' and out.shape == (2, 5, 16)


@pytest.mark.parametrize('device', DEVICES)
def test_opcheck(device):
    inputs = make_inputs(dtype=torch.float32, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.detrx.ms_deform_attn_forward, (*inputs, 64))
    value, shapes, starts, locations, weights = inputs
    grad_output = torch.randn(2, 5, 16, device=device)
    torch.library.opcheck(torch.ops.detrx.ms_deform_attn_backward,
                          (value.detach(), shapes, starts, locations.detach(), weights.detach(),
                           grad_output, 64))


@pytest.mark.parametrize('device', DEVICES)
def test_torch_compile_fullgraph(device):
    value, shapes, starts, locations, weights = make_inputs(dtype=torch.float32, device=device)

    def layer(value, locations, weights):
        return ms_deform_attn(value * 2, shapes, starts, locations.clamp(0, 1), weights).relu()

    compiled = torch.compile(layer, fullgraph=True, backend='aot_eager')
    outs, grads = [], []
    for fn in (layer, compiled):
        inputs = [t.detach().requires_grad_() for t in (value, locations, weights)]
        out = fn(*inputs)
        grads.append(torch.autograd.grad(out.sum(), inputs))
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_torch_compile_inductor():
    value, shapes, starts, locations, weights = make_inputs(dtype=torch.float32)
    fn = torch.compile(lambda v, l, w: ms_deform_attn(v, shapes, starts, l, w).tanh(),
                       fullgraph=True)
    torch.testing.assert_close(fn(value, locations, weights),
                               ms_deform_attn(value, shapes, starts, locations, weights).tanh())


def test_torch_export():

    class Sampler(torch.nn.Module):

        def forward(self, value, shapes, starts, locations, weights):
            return ms_deform_attn(value, shapes, starts, locations, weights)

    inputs = make_inputs(dtype=torch.float32)
    exported = torch.export.export(Sampler(), inputs)
    targets = [str(node.target) for node in exported.graph.nodes if node.op == 'call_function']
    assert targets == ['detrx.ms_deform_attn_forward.default']
    torch.testing.assert_close(exported.module()(*inputs), Sampler()(*inputs))


def test_onnx_export_uses_standard_ops(tmp_path):
    onnx = pytest.importorskip('onnx')

    class Sampler(torch.nn.Module):

        def forward(self, value, locations, weights):
            return ms_deform_attn(value, shapes, starts, locations, weights)

    value, shapes, starts, locations, weights = make_inputs(dtype=torch.float32)
    path = str(tmp_path / 'msda.onnx')
    torch.onnx.export(Sampler(), (value, locations, weights), path, dynamo=False)
    op_types = {node.op_type for node in onnx.load(path).graph.node}
    assert 'GridSample' in op_types


class RecordDtypes(TorchDispatchMode):
    """Records the input dtypes of every native forward call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if 'ms_deform_attn_forward' in str(func):
            self.calls.append(tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('locations_dtype', [torch.float32, torch.bfloat16])
def test_autocast_runs_mixed_precision(device, locations_dtype):
    """Under autocast: value in the autocast dtype, locations and weights in float32."""
    value, shapes, starts, locations, weights = make_inputs(dtype=torch.float32, device=device,
                                                            requires_grad=True)
    locations, weights = (t.detach().to(locations_dtype).requires_grad_()
                          for t in (locations, weights))
    proj = torch.nn.Linear(8, 8).to(device)
    with torch.autocast(device, dtype=torch.bfloat16), RecordDtypes() as recorder:
        projected = proj(value)  # bfloat16 under autocast
        assert projected.dtype == torch.bfloat16
        out = ms_deform_attn(projected, shapes, starts, locations, weights)
        # A float32 value is cast down as well.
        out_from_float = ms_deform_attn(value, shapes, starts, locations, weights)
    mixed = (torch.bfloat16, torch.int64, torch.int64, torch.float32, torch.float32)
    assert recorder.calls == [mixed, mixed]
    assert out.dtype == out_from_float.dtype == torch.bfloat16
    out.float().sum().backward()
    assert value.grad is not None and locations.grad.dtype == locations_dtype
    assert weights.grad.dtype == locations_dtype
    expected = ms_deform_attn(projected.detach().float(), shapes, starts,
                              locations.detach().float(), weights.detach().float())
    torch.testing.assert_close(out.detach().float(), expected, atol=2e-2, rtol=2**-8)


def test_torch_compile_fullgraph_under_autocast():
    """The autocast casts live in ms_deform_attn, so torch.compile traces them in one graph."""
    value, shapes, starts, locations, weights = make_inputs(dtype=torch.float32)

    def layer(value, locations, weights):
        return ms_deform_attn(value * 2, shapes, starts, locations, weights)

    compiled = torch.compile(layer, fullgraph=True, backend='aot_eager')
    with torch.autocast('cpu', dtype=torch.bfloat16):
        actual, expected = compiled(value, locations, weights), layer(value, locations, weights)
    assert actual.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)


@pytest.mark.parametrize('device', DEVICES)
def test_autocast_leaves_float64_alone(device):
    inputs = make_inputs(dtype=torch.float64, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = ms_deform_attn(*inputs)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ms_deform_attn_pytorch(*inputs[:2], *inputs[3:]),
                               atol=1e-10, rtol=0)


# --- mixed precision: float16 / bfloat16 value with float32 / float64 locations and weights ---

MIXED_PAIRS = [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
               (torch.bfloat16, torch.float64), (torch.float16, torch.float64),
               (torch.float32, torch.float64)]


def mixed_inputs(value_dtype, coordinate_dtype, device, **kwargs):
    value, shapes, starts, locations, weights = make_inputs(
        channels=40, points=4, dtype=torch.float64, device=device, **kwargs)
    return (value.to(value_dtype), shapes, starts, locations.to(coordinate_dtype),
            weights.to(coordinate_dtype))


def outputs_and_grads(value, shapes, starts, locations, weights, grad_output, fn=None):
    fn = fn or ms_deform_attn
    leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]
    out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
    return [out.detach()] + list(torch.autograd.grad(out, leaves, grad_output))


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('value_dtype,coordinate_dtype', MIXED_PAIRS)
def test_mixed_precision_is_the_wide_path_rounded_once(device, value_dtype, coordinate_dtype):
    """Mixed precision computes exactly what the coordinates' dtype computes on the same
    (rounded) value: output and grad_value are that result rounded once to value's dtype, and
    the location / weight gradients are that result itself."""
    value, shapes, starts, locations, weights = mixed_inputs(value_dtype, coordinate_dtype,
                                                             device)
    generator = torch.Generator().manual_seed(3)
    grad_output = torch.randn(2, 5, 2 * 40, generator=generator).to(device, value_dtype)
    mixed = outputs_and_grads(value, shapes, starts, locations, weights, grad_output)
    wide = outputs_and_grads(value.to(coordinate_dtype), shapes, starts, locations, weights,
                             grad_output.to(coordinate_dtype))
    assert [t.dtype for t in mixed] == [value_dtype, value_dtype, coordinate_dtype,
                                        coordinate_dtype]
    if device == 'cpu':  # same arithmetic in the same order: bitwise
        assert torch.equal(mixed[0], wide[0].to(value_dtype))
        assert torch.equal(mixed[1], wide[1].to(value_dtype))
        assert torch.equal(mixed[2], wide[2]) and torch.equal(mixed[3], wide[3])
    else:  # atomics: summation order differs from run to run
        eps = torch.finfo(value_dtype).eps
        for actual, expected, tol in zip(mixed, wide, (eps, eps, 1e-5, 1e-5)):
            scale = expected.abs().max().item()
            torch.testing.assert_close(actual.to(coordinate_dtype), expected, rtol=tol,
                                       atol=tol * 1e-2 * scale)


# Documented tolerance of mixed precision against the float32 op on unrounded inputs (the error
# is the rounding of value to its dtype, then of the results): docs/msda.md.
# Measured worst |error| / (|expected| + max(max|expected|, 1)) over 5 seeds: 3.5e-3 (bf16),
# 3.1e-4 (fp16).
MIXED_TOLERANCE = {torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
                   torch.float16: dict(atol=1.5e-3, rtol=1.5e-3)}


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('value_dtype', [torch.bfloat16, torch.float16])
def test_mixed_precision_matches_float32_within_tolerance(device, value_dtype):
    value, shapes, starts, locations, weights = make_inputs(
        channels=40, points=4, dtype=torch.float32, device=device, low=-0.1, high=1.1)
    weights = weights / weights.sum((-1, -2), keepdim=True)  # softmax-like: outputs O(|value|)
    grad_output = torch.randn(2, 5, 2 * 40, generator=torch.Generator().manual_seed(4)).to(device)
    mixed = outputs_and_grads(value.to(value_dtype), shapes, starts, locations, weights,
                              grad_output.to(value_dtype))
    reference = outputs_and_grads(value, shapes, starts, locations, weights, grad_output)
    for name, actual, expected in zip(('output', 'grad_value', 'grad_sampling_locations',
                                       'grad_attention_weights'), mixed, reference):
        scale = max(expected.abs().max().item(), 1.0)
        tol = MIXED_TOLERANCE[value_dtype]
        torch.testing.assert_close(actual.float(), expected, rtol=tol['rtol'],
                                   atol=tol['atol'] * scale, msg=lambda m, n=name: f'{n}: {m}')


@pytest.mark.parametrize('device', DEVICES)
def test_mixed_precision_matches_reference(device):
    """float32 value with float64 locations: the reference samples in float64 as well."""
    value, shapes, starts, locations, weights = mixed_inputs(torch.float32, torch.float64,
                                                             device)
    grad_output = torch.randn(2, 5, 80, generator=torch.Generator().manual_seed(5)).to(device)
    native = outputs_and_grads(value, shapes, starts, locations, weights, grad_output)
    reference = outputs_and_grads(
        value, shapes, starts, locations, weights, grad_output,
        fn=lambda v, s, i, loc, w: ms_deform_attn_pytorch(v, s, loc, w))
    for actual, expected in zip(native, reference):
        assert actual.dtype == expected.dtype
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('device', DEVICES)
def test_opcheck_mixed_precision(device):
    value, shapes, starts, locations, weights = mixed_inputs(torch.bfloat16, torch.float32,
                                                             device)
    inputs = [value.requires_grad_(), shapes, starts, locations.requires_grad_(),
              weights.requires_grad_()]
    torch.library.opcheck(torch.ops.detrx.ms_deform_attn_forward, (*inputs, 64))
    grad_output = torch.randn(2, 5, 80, device=device).bfloat16()
    torch.library.opcheck(torch.ops.detrx.ms_deform_attn_backward,
                          (value.detach(), shapes, starts, locations.detach(), weights.detach(),
                           grad_output, 64))


def test_meta_tensors_give_mixed_precision_dtypes():
    value, shapes, starts, locations, weights = mixed_inputs(torch.bfloat16, torch.float32,
                                                             'meta')
    out = torch.ops.detrx.ms_deform_attn_forward(value, shapes, starts, locations, weights, 64)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 5, 80)
    grads = torch.ops.detrx.ms_deform_attn_backward(value, shapes, starts, locations, weights,
                                                    out, 64)
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]


UNSUPPORTED_MIXES = [  # (value, locations, weights, argument named in the error)
    (torch.float16, torch.bfloat16, torch.bfloat16, 'sampling_locations'),
    (torch.bfloat16, torch.float16, torch.float16, 'sampling_locations'),
    (torch.float32, torch.bfloat16, torch.bfloat16, 'sampling_locations'),
    (torch.float64, torch.float32, torch.float32, 'sampling_locations'),
    (torch.bfloat16, torch.float32, torch.bfloat16, 'attention_weights'),
    (torch.bfloat16, torch.float32, torch.float64, 'attention_weights'),
]


@pytest.mark.parametrize('value_dtype,locations_dtype,weights_dtype,argument', UNSUPPORTED_MIXES)
def test_unsupported_dtype_mixes_are_rejected(value_dtype, locations_dtype, weights_dtype,
                                              argument):
    value, shapes, starts, locations, weights = make_inputs()
    inputs = (value.to(value_dtype), shapes, starts, locations.to(locations_dtype),
              weights.to(weights_dtype))
    with pytest.raises(TypeError, match=argument):
        ms_deform_attn(*inputs)
    with pytest.raises(TypeError, match=argument):
        torch.ops.detrx.ms_deform_attn_forward(*inputs, 64)
    grad_output = torch.zeros(2, 5, 16, dtype=value_dtype)
    with pytest.raises(TypeError, match=argument):
        torch.ops.detrx.ms_deform_attn_backward(*inputs, grad_output, 64)
    with pytest.raises(TypeError, match=argument):  # the fake kernel agrees
        torch.ops.detrx.ms_deform_attn_forward(*(t.to('meta') for t in inputs), 64)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_fuzz_against_reference(data):
    levels = data.draw(st.integers(1, 3), label='levels')
    spatial_shapes = [(data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6)))
                      for _ in range(levels)]
    inputs = make_inputs(
        spatial_shapes=spatial_shapes,
        batch=data.draw(st.integers(0, 2), label='batch'),
        queries=data.draw(st.integers(0, 4), label='queries'),
        heads=data.draw(st.integers(1, 3), label='heads'),
        channels=data.draw(st.integers(1, 19), label='channels'),
        points=data.draw(st.integers(1, 3), label='points'),
        low=-0.5, high=1.5,
        seed=data.draw(st.integers(0, 2**16), label='seed'))
    assert_matches_reference(inputs, atol=1e-10,
                             im2col_step=data.draw(st.integers(1, 3), label='im2col_step'))


# --- bad input: ValueError / TypeError naming the argument, from the one check of each path ----
# (the native op's C++ check for the wrapper and the raw ops; the Python check for the fake
# kernel and the reference)

def _bad_inputs(case, other_device='meta'):
    value, shapes, starts, locations, weights = make_inputs(dtype=torch.float32)
    if case == 'value_rank':
        value = value.flatten(2)
    elif case == 'locations_rank':
        locations = locations[..., 0]
    elif case == 'weights_shape':
        weights = weights[:, :, :, :, :1]
    elif case == 'shapes_sum':
        shapes = shapes.clone()
        shapes[0, 0] += 1
    elif case == 'shapes_dtype':
        shapes = shapes.int()
    elif case == 'starts_negative':
        starts = starts.clone()
        starts[1] = -5
    elif case == 'starts_oversize':
        starts = starts.clone()
        starts[2] = 10**6
    elif case == 'locations_dtype':
        locations = locations.double()
    elif case == 'weights_dtype':
        weights = weights.half()
    elif case == 'value_device':
        value = value.to(other_device)
    return value, shapes, starts, locations, weights


BAD_CASES = [  # (case, argument named in the message, Python exception type)
    ('value_rank', 'value', ValueError),
    ('locations_rank', 'sampling_locations', ValueError),
    ('weights_shape', 'attention_weights', ValueError),
    ('shapes_sum', 'spatial_shapes', ValueError),
    ('shapes_dtype', 'spatial_shapes', TypeError),
    ('starts_negative', 'level_start_index', ValueError),
    ('starts_oversize', 'level_start_index', ValueError),
    ('locations_dtype', 'sampling_locations', TypeError),
    ('weights_dtype', 'attention_weights', TypeError),
    ('value_device', 'spatial_shapes', ValueError),
]


@pytest.mark.parametrize('case,argument,error', BAD_CASES)
def test_wrapper_rejects_bad_input(case, argument, error):
    with pytest.raises(error, match=argument):
        ms_deform_attn(*_bad_inputs(case))


@pytest.mark.parametrize('case,argument,error', BAD_CASES)
def test_native_op_rejects_bad_input(case, argument, error):
    # meta dispatches to the fake kernel, which runs the same checks
    inputs = _bad_inputs(case, other_device='cuda' if 'cuda' in DEVICES else 'meta')
    with pytest.raises(error, match=argument):
        torch.ops.detrx.ms_deform_attn_forward(*inputs, 64)
    value, shapes, starts, locations, weights = inputs
    grad_output = torch.zeros(locations.shape[0], locations.shape[1],
                              value.shape[2] * value.shape[-1], device=value.device)
    with pytest.raises(error, match=argument):
        torch.ops.detrx.ms_deform_attn_backward(*inputs, grad_output, 64)


def test_bad_im2col_step_and_grad_output():
    inputs = make_inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match='im2col_step'):
        ms_deform_attn(*inputs, im2col_step=0)
    with pytest.raises(ValueError, match='im2col_step'):
        torch.ops.detrx.ms_deform_attn_forward(*inputs, 0)
    with pytest.raises(ValueError, match='grad_output'):
        torch.ops.detrx.ms_deform_attn_backward(*inputs, torch.zeros(2, 5, 15), 64)


def test_cpu_backward_refuses_levels_wider_than_2_to_the_30():
    """The CPU backward plans the points in int32 pixel coordinates: a level wider than 2^30
    (2^30 tokens per (batch, head)) is refused naming spatial_shapes before any memory is read.
    value is expanded from one element, so the test allocates nothing large."""
    side = 2 ** 30 + 1
    value = torch.zeros(1, 1, 1, 1).expand(1, side, 1, 1)
    locations, weights = torch.full((1, 2, 1, 1, 1, 2), 0.5), torch.ones(1, 2, 1, 1, 1)
    with pytest.raises(ValueError, match=r'spatial_shapes\[0\] = \(1, 1073741825\)'):
        torch.ops.detrx.ms_deform_attn_backward(value, torch.tensor([[1, side]]),
                                                torch.tensor([0]), locations, weights,
                                                torch.zeros(1, 2, 1), 64)


NAMES = ('value', 'spatial_shapes', 'level_start_index', 'sampling_locations',
         'attention_weights', 'grad_output')


@pytest.mark.parametrize('on_meta', NAMES)
def test_raw_ops_refuse_one_input_on_meta(on_meta):
    """The meta dispatch key wins when any input is on meta: the fake kernel must refuse the
    mix instead of returning uninitialised memory."""
    value, shapes, starts, locations, weights = make_inputs(dtype=torch.float32)
    tensors = dict(zip(NAMES, (value, shapes, starts, locations, weights,
                               torch.zeros(2, 5, 16))))
    tensors[on_meta] = tensors[on_meta].to('meta')
    forward_args = [tensors[name] for name in NAMES[:5]]
    named = 'spatial_shapes' if on_meta == 'value' else on_meta
    if on_meta != 'grad_output':
        with pytest.raises(ValueError, match=f'{named} must be on'):
            torch.ops.detrx.ms_deform_attn_forward(*forward_args, 64)
    with pytest.raises(ValueError, match=f'{named} must be on'):
        torch.ops.detrx.ms_deform_attn_backward(*forward_args, tensors['grad_output'], 64)


# --- validation of device index tensors: once per tensor (no per-call host copy) --------------

# The validation cache's test hook lives outside the public `detrx` namespace.
validate_index_values = torch.ops.detrx_testing.ms_deform_attn_validate_index_values


def test_test_hooks_are_not_in_the_public_namespace():
    assert not hasattr(torch.ops.detrx, '_ms_deform_attn_validate_index_values')
    assert not hasattr(torch.ops.detrx, 'ms_deform_attn_validate_index_values')


def _index_tensors(spatial_shapes=((6, 7), (3, 4), (1, 2))):
    shapes = torch.tensor(spatial_shapes)
    sizes = shapes.prod(1)
    return shapes, torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]]), int(sizes.sum())


def test_index_validation_is_cached_per_tensor_state():
    shapes, starts, num_value = _index_tensors()
    assert validate_index_values(shapes, starts, num_value) is False  # read (a copy on a GPU)
    assert validate_index_values(shapes, starts, num_value) is True  # cached
    # The same values in new tensors are new tensors.
    assert validate_index_values(shapes.clone(), starts, num_value) is False
    # Another token count is another question.
    with pytest.raises(ValueError, match='spatial_shapes'):
        validate_index_values(shapes, starts, num_value + 1)
    # An in-place change bumps the version counter: read again, and rejected.
    shapes[0, 0] = 2**32
    with pytest.raises(ValueError, match='spatial_shapes'):
        validate_index_values(shapes, starts, num_value)
    shapes[0, 0] = 6  # back to valid values: a new version, read again
    assert validate_index_values(shapes, starts, num_value) is False
    assert validate_index_values(shapes, starts, num_value) is True
    starts[1] = -5  # either tensor
    with pytest.raises(ValueError, match='level_start_index'):
        validate_index_values(shapes, starts, num_value)


def test_index_validation_never_caches_a_rejection():
    shapes, starts, num_value = _index_tensors(((2**32, 2**32), (7, 8)))
    starts.zero_()
    for _ in range(2):
        with pytest.raises(ValueError, match='spatial_shapes'):
            validate_index_values(shapes, starts, 56)


def test_index_validation_sees_writes_through_views():
    shapes, starts, num_value = _index_tensors()
    assert validate_index_values(shapes, starts, num_value) is False
    view = shapes[:]  # another tensor: not known to be valid
    assert validate_index_values(view, starts, num_value) is False
    view.mul_(2)  # writes through a view bump the shared version counter
    with pytest.raises(ValueError, match='spatial_shapes'):
        validate_index_values(shapes, starts, num_value)


def test_index_validation_does_not_cache_inference_tensors():
    with torch.inference_mode():
        shapes, starts, num_value = _index_tensors()
        for _ in range(2):  # no version counter to trust: read every time
            assert validate_index_values(shapes, starts, num_value) is False
