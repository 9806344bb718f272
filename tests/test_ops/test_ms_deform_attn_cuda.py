"""CUDA kernels of multi-scale deformable attention (ops/cuda) against the grid_sample reference.

Skipped without a GPU, or when mmdet_detrx._C was built without its CUDA kernels
(``FORCE_CUDA=1 pip install -e .`` builds them, see docs/cuda.md).
"""
import warnings

import pytest
import torch

from mmdet_detrx.ops import ms_deform_attn, ms_deform_attn_pytorch, use_pytorch_ms_deform_attn


def _has_cuda_kernel():
    import mmdet_detrx.ops.ms_deform_attn  # noqa: F401  (loads mmdet_detrx._C if built)
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key('detrx::ms_deform_attn_forward',
                                                               'CUDA')
    except RuntimeError:  # the op is not registered at all (extension not built)
        return False


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device'),
    pytest.mark.skipif(torch.cuda.is_available() and not _has_cuda_kernel(),
                       reason='mmdet_detrx._C has no CUDA kernel (build with FORCE_CUDA=1)'),
]

DEVICE = 'cuda'
# (H, W) per level: odd sizes, a 1-pixel level and non-square maps.
SHAPES = [(13, 17), (7, 9), (4, 5), (1, 1)]


def make_inputs(batch=2, heads=2, channels=8, shapes=SHAPES, queries=11, points=3,
                dtype=torch.float64, device=DEVICE, seed=0, requires_grad=False):
    """Random inputs; ~15% of the sampling locations lie (partly) outside the maps."""
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    levels = len(shapes)
    value = torch.randn(batch, int(sizes.sum()), heads, channels, generator=gen,
                        dtype=torch.float64)
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=gen,
                           dtype=torch.float64) * 1.3 - 0.15
    weights = torch.rand(batch, queries, heads, levels, points, generator=gen,
                         dtype=torch.float64)
    weights = weights / weights.sum((-2, -1), keepdim=True)
    value, locations, weights = (t.to(device, dtype).requires_grad_(requires_grad)
                                 for t in (value, locations, weights))
    return value, spatial_shapes.to(device), level_start_index.to(device), locations, weights


def forward_native(value, spatial_shapes, level_start_index, locations, weights, im2col_step=64):
    return torch.ops.detrx.ms_deform_attn_forward(value, spatial_shapes, level_start_index,
                                                  locations, weights, im2col_step)


def output_and_grads(fn, value, spatial_shapes, level_start_index, locations, weights,
                     grad_output=None):
    """Output and (value, locations, weights) gradients of fn for a fixed upstream gradient."""
    inputs = [t.detach().clone().requires_grad_(True) for t in (value, locations, weights)]
    output = fn(inputs[0], spatial_shapes, level_start_index, inputs[1], inputs[2])
    if grad_output is None:
        gen = torch.Generator().manual_seed(1)
        grad_output = torch.randn(output.shape, generator=gen, dtype=torch.float64)
    output.backward(grad_output.to(output.device, output.dtype))
    return [output.detach()] + [t.grad for t in inputs]


def native(value, spatial_shapes, level_start_index, locations, weights):
    return ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)


def reference(value, spatial_shapes, level_start_index, locations, weights):
    return ms_deform_attn_pytorch(value, spatial_shapes, locations, weights)


def assert_all_close(actual, expected, rtol, atol):
    names = ('output', 'grad_value', 'grad_sampling_locations', 'grad_attention_weights')
    for name, a, e in zip(names, actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f'{name}: {m}')


@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-10), (torch.float32, 2e-5)],
                         ids=['float64', 'float32'])
@pytest.mark.parametrize('channels', [1, 2, 4, 8, 32, 30, 71])
def test_forward_and_gradients_match_reference(dtype, tol, channels):
    inputs = make_inputs(channels=channels, dtype=dtype)
    assert_all_close(output_and_grads(native, *inputs), output_and_grads(reference, *inputs),
                     rtol=tol, atol=tol)


def test_many_channels_per_lane():
    # C = 1025 needs 33 strides of a 32-lane group (odd C: scalar loads).
    inputs = make_inputs(batch=1, heads=1, channels=1025, queries=5, dtype=torch.float32)
    assert_all_close(output_and_grads(native, *inputs), output_and_grads(reference, *inputs),
                     rtol=2e-5, atol=2e-5)


def test_gradcheck_fp64():
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        batch=1, heads=2, channels=3, shapes=[(5, 6), (3, 2)], queries=4, points=2,
        requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn(v, spatial_shapes, level_start_index, loc, w),
        (value, locations, weights), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize('dtype,eps', [(torch.float16, 2**-10), (torch.bfloat16, 2**-7)],
                         ids=['float16', 'bfloat16'])
@pytest.mark.parametrize('channels', [32, 30, 71])
def test_half_precision_matches_fp32(dtype, eps, channels):
    """fp16 / bf16 accumulate in fp32: on the same (rounded) inputs the only difference from an
    fp32 run is the final rounding of each result."""
    low = make_inputs(channels=channels, dtype=dtype)
    fp32 = [t.float() if t.is_floating_point() else t for t in low]
    gen = torch.Generator().manual_seed(1)
    grad_output = torch.randn(*low[3].shape[:3], channels, generator=gen).flatten(2).to(dtype)
    actual = output_and_grads(native, *low, grad_output=grad_output)
    expected = output_and_grads(native, *fp32, grad_output=grad_output.float())
    for a, e in zip(actual, expected):
        assert a.dtype == dtype
        # atol for results that are (near-)subnormal in fp16 next to the tensor's largest.
        scale = e.abs().max().item()
        torch.testing.assert_close(a.float(), e, rtol=eps, atol=eps * 1e-2 * scale)


def test_batch_not_divisible_by_im2col_step():
    inputs = make_inputs(batch=3, dtype=torch.float32)

    def native_step2(value, spatial_shapes, level_start_index, locations, weights):
        return ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights,
                              im2col_step=2)

    assert_all_close(output_and_grads(native_step2, *inputs),
                     output_and_grads(reference, *inputs), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize('batch,queries', [(0, 5), (2, 0)])
def test_empty_batch_or_queries(batch, queries):
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        batch=batch, queries=queries, dtype=torch.float32)
    output = forward_native(value, spatial_shapes, level_start_index, locations, weights)
    assert output.shape == (batch, queries, value.shape[2] * value.shape[3])
    grad_output = torch.ones_like(output)
    grads = torch.ops.detrx.ms_deform_attn_backward(value, spatial_shapes, level_start_index,
                                                    locations, weights, grad_output, 64)
    for grad, like in zip(grads, (value, locations, weights)):
        assert grad.shape == like.shape and grad.dtype == like.dtype
        assert not grad.any()


def test_non_contiguous_inputs():
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        channels=8, dtype=torch.float32)
    # Same values behind transposed / strided storage.
    value_nc = value.transpose(0, 1).contiguous().transpose(0, 1)
    locations_nc = torch.stack([locations[..., 0], locations[..., 1]], dim=0).movedim(0, -1)
    weights_nc = weights.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (value_nc.is_contiguous() or locations_nc.is_contiguous()
                or weights_nc.is_contiguous())
    assert_all_close(
        output_and_grads(native, value_nc, spatial_shapes, level_start_index, locations_nc,
                         weights_nc),
        output_and_grads(reference, value, spatial_shapes, level_start_index, locations,
                         weights), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16], ids=['float32', 'float16'])
def test_misaligned_storage_uses_scalar_loads(dtype):
    """A contiguous view at an odd element offset cannot use packed loads: still correct."""
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        channels=8, dtype=dtype)
    storage = torch.empty(value.numel() + 1, dtype=dtype, device=DEVICE)
    value_offset = storage[1:].view(value.shape)
    value_offset.copy_(value)
    # One element off: not aligned for packs of 2 (or 4) elements.
    assert value_offset.is_contiguous()
    assert value_offset.data_ptr() % (2 * value_offset.element_size()) != 0
    expected = forward_native(value, spatial_shapes, level_start_index, locations, weights)
    actual = forward_native(value_offset, spatial_shapes, level_start_index, locations, weights)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_points_off_the_maps_contribute_nothing():
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        dtype=torch.float32)
    far = torch.tensor([-1e6, -1.0, 2.0, 1e6, float('inf'), -float('inf'), float('nan')],
                       device=DEVICE)
    index = torch.randint(len(far), locations.shape, generator=torch.Generator().manual_seed(2))
    locations = far[index.to(DEVICE)]
    output, grad_value, grad_locations, grad_weights = output_and_grads(
        native, value, spatial_shapes, level_start_index, locations, weights)
    torch.cuda.synchronize()  # surface any illegal memory access here
    for tensor in (output, grad_value, grad_locations, grad_weights):
        assert not tensor.any()


def test_sampling_pixel_centres_reads_exact_values():
    """A point at a pixel centre with weight 1 returns that pixel of that level exactly."""
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        batch=1, heads=1, channels=5, queries=1, points=1, dtype=torch.float64)
    H, W = SHAPES[0]
    row, col = 6, 11
    locations = torch.zeros_like(locations)
    locations[..., 0] = (col + 0.5) / W
    locations[..., 1] = (row + 0.5) / H
    weights = torch.zeros_like(weights)
    weights[:, :, :, 0] = 1.0
    output = forward_native(value, spatial_shapes, level_start_index, locations, weights)
    torch.testing.assert_close(output[0, 0], value[0, row * W + col, 0], rtol=0, atol=1e-12)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs two GPUs')
def test_runs_on_the_inputs_device():
    inputs = make_inputs(dtype=torch.float32, device='cuda:1')
    actual = output_and_grads(native, *inputs)
    assert all(t.device == torch.device('cuda:1') for t in actual)
    assert_all_close(actual, output_and_grads(reference, *inputs), rtol=2e-5, atol=2e-5)


class TinyDeformableAttention(torch.nn.Module):
    """Deformable-DETR-style cross attention: offsets and weights predicted from the query."""

    def __init__(self, embed_dims=32, num_heads=4, num_levels=2, num_points=4):
        super().__init__()
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.sampling_offsets = torch.nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = torch.nn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = torch.nn.Linear(embed_dims, embed_dims)
        self.output_proj = torch.nn.Linear(embed_dims, embed_dims)

    def forward(self, query, reference_points, value, spatial_shapes, level_start_index):
        B, Q, _ = query.shape
        heads, L, P = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value).view(B, value.shape[1], heads, -1)  # (B, S, heads, C)
        offsets = self.sampling_offsets(query).view(B, Q, heads, L, P, 2)
        normaliser = torch.stack([spatial_shapes[:, 1], spatial_shapes[:, 0]], -1)  # (L, 2)
        locations = (reference_points[:, :, None, None, None, :] +
                     offsets / normaliser[None, None, None, :, None, :])
        weights = self.attention_weights(query).view(B, Q, heads, L * P).softmax(-1)
        weights = weights.view(B, Q, heads, L, P)
        output = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(output.to(query.dtype))


def _train_step(use_reference):
    torch.manual_seed(0)
    model = TinyDeformableAttention().to(DEVICE)
    spatial_shapes = torch.tensor([[16, 20], [8, 10]], device=DEVICE)
    level_start_index = torch.tensor([0, 320], device=DEVICE)
    value = torch.randn(3, 400, 32, device=DEVICE)
    query = torch.randn(3, 50, 32, device=DEVICE)
    reference_points = torch.rand(3, 50, 2, device=DEVICE)
    target = torch.randn(3, 50, 32, device=DEVICE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast('cuda', dtype=torch.bfloat16), \
            use_pytorch_ms_deform_attn(use_reference):
        output = model(query, reference_points, value, spatial_shapes, level_start_index)
        loss = torch.nn.functional.mse_loss(output.float(), target)
    loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    optimizer.step()
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
    return loss.detach(), grads, changed


def test_bf16_autocast_training_step():
    loss, grads, changed = _train_step(use_reference=False)
    ref_loss, ref_grads, _ = _train_step(use_reference=True)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert all(changed), 'every parameter (offsets and weights included) must get a gradient'
    torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=1e-4)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, rtol=0, atol=2e-2 * ref.abs().max().item() + 1e-6)


@pytest.mark.slow
def test_indices_beyond_int32():
    """value with more than 2^31 elements: the last pixels are read and written, no overflow."""
    heads, channels = 8, 256
    H, W = 1100, 1000  # 1.1e6 tokens * 2048 = 2.25e9 elements > 2^31 (9 GB in fp32)
    free, _ = torch.cuda.mem_get_info()
    if free < 32 * 2**30:
        pytest.skip('needs 32 GiB of free GPU memory')
    value = torch.zeros(1, H * W, heads, channels, device=DEVICE)
    # The last two rows hold one vector per head, so any bilinear sample among them returns it.
    last_rows = (torch.arange(heads * channels, device=DEVICE) % 7 + 1.0).view(heads, channels)
    value[0, -2 * W:] = last_rows
    spatial_shapes = torch.tensor([[H, W]], device=DEVICE)
    level_start_index = torch.tensor([0], device=DEVICE)
    # Between the centres of the last two rows / columns: all four corners inside the map.
    locations = torch.tensor([(W - 0.75) / W, (H - 0.75) / H], device=DEVICE)
    locations = locations.expand(1, 1, heads, 1, 1, 2).contiguous()
    weights = torch.ones(1, 1, heads, 1, 1, device=DEVICE)
    output = forward_native(value, spatial_shapes, level_start_index, locations, weights)
    torch.testing.assert_close(output.view(heads, channels), last_rows, rtol=1e-6, atol=1e-5)

    grad_value, grad_locations, grad_weights = torch.ops.detrx.ms_deform_attn_backward(
        value, spatial_shapes, level_start_index, locations, weights, torch.ones_like(output),
        64)
    del value
    # The bilinear weights of the four corners sum to one for every (head, channel).
    corner_sums = grad_value[0, -2 * W:].sum(0)
    torch.testing.assert_close(corner_sums, torch.ones_like(corner_sums), rtol=0, atol=1e-5)
    assert grad_value[0, :-2 * W].abs().sum().item() == 0
    torch.testing.assert_close(grad_weights.view(heads), last_rows.sum(1), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(grad_locations, torch.zeros_like(grad_locations), rtol=0,
                               atol=1e-2)


@pytest.mark.parametrize('value_dtype,coordinate_dtype',
                         [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                          (torch.bfloat16, torch.float64), (torch.float32, torch.float64)])
def test_mixed_precision_matches_the_wide_path(value_dtype, coordinate_dtype):
    """Low-precision value with wide locations / weights: the coordinates' dtype's result on the
    same rounded value, output and grad_value rounded once to value's dtype."""
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(channels=30)
    value = value.to(value_dtype)
    locations, weights = locations.to(coordinate_dtype), weights.to(coordinate_dtype)
    gen = torch.Generator().manual_seed(1)
    grad_output = torch.randn(2, 11, 60, generator=gen).to(DEVICE, value_dtype)
    actual = output_and_grads(native, value, spatial_shapes, level_start_index, locations,
                              weights, grad_output=grad_output)
    expected = output_and_grads(native, value.to(coordinate_dtype), spatial_shapes,
                                level_start_index, locations, weights,
                                grad_output=grad_output.to(coordinate_dtype))
    assert [t.dtype for t in actual] == [value_dtype, value_dtype, coordinate_dtype,
                                         coordinate_dtype]
    eps = torch.finfo(value_dtype).eps
    for a, e, tol in zip(actual, expected, (eps, eps, 1e-5, 1e-5)):
        scale = e.abs().max().item()
        torch.testing.assert_close(a.to(coordinate_dtype), e, rtol=tol, atol=tol * 1e-2 * scale)


def test_validated_index_tensors_cost_no_host_sync():
    """After the first call on a pair of index tensors, forward and backward only enqueue
    work: torch's sync debug mode turns any synchronising call into an error."""
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        dtype=torch.float32, requires_grad=True)
    ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights).sum().backward()
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode('error')
    try:
        out = torch.ops.detrx.ms_deform_attn_forward(value.detach(), spatial_shapes,
                                                     level_start_index, locations.detach(),
                                                     weights.detach(), 64)
        torch.ops.detrx.ms_deform_attn_backward(value.detach(), spatial_shapes,
                                                level_start_index, locations.detach(),
                                                weights.detach(), torch.ones_like(out), 64)
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def test_cuda_graph_capture_and_replay():
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        dtype=torch.float32)
    static_value = value.clone()
    expected = forward_native(value, spatial_shapes, level_start_index, locations, weights)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graphs requires
        forward_native(static_value, spatial_shapes, level_start_index, locations, weights)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = forward_native(static_value, spatial_shapes, level_start_index, locations,
                                    weights)
    static_value.copy_(value * 2)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_out, 2 * expected, rtol=1e-5, atol=1e-5)


def test_capture_with_unvalidated_index_tensors_fails_clearly():
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        dtype=torch.float32)
    fresh_shapes = spatial_shapes.clone()  # never validated
    forward_native(value, spatial_shapes, level_start_index, locations, weights)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match='before CUDA graph capture'):
        with torch.cuda.graph(graph):
            forward_native(value, fresh_shapes, level_start_index, locations, weights)


def test_index_tensors_changed_behind_the_check_trap_instead_of_reading_out_of_bounds():
    """A write that bypasses the version counter (.data) cannot fool the device-side guard. It
    traps, which ruins the CUDA context: run it in a child process."""
    import subprocess
    import sys
    code = (
        'import torch\n'
        'import mmdet_detrx.ops\n'
        'value = torch.randn(1, 12, 1, 4, device="cuda")\n'
        'shapes = torch.tensor([[3, 4]], device="cuda")\n'
        'starts = torch.tensor([0], device="cuda")\n'
        'loc = torch.rand(1, 2, 1, 1, 1, 2, device="cuda")\n'
        'w = torch.rand(1, 2, 1, 1, 1, device="cuda")\n'
        'torch.ops.detrx.ms_deform_attn_forward(value, shapes, starts, loc, w, 64)\n'
        'shapes.data[0, 0] = 2**32\n'  # bypasses the version counter
        'torch.ops.detrx.ms_deform_attn_forward(value, shapes, starts, loc, w, 64)\n'
        'torch.cuda.synchronize()\n')
    proc = subprocess.run([sys.executable, '-c', code], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode != 0
    assert 'changed after validation' in proc.stdout


@pytest.fixture
def deterministic_algorithms():
    """Restores torch's deterministic-algorithms setting after the test."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def test_deterministic_mode_alerts_in_the_backward(deterministic_algorithms):
    """The backward scatters grad_value with atomicAdd (run-dependent summation order): under
    torch.use_deterministic_algorithms(True) it raises PyTorch's standard alert naming the op,
    a warning with warn_only=True; the forward is deterministic and runs."""
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        dtype=torch.float32, requires_grad=True)
    torch.use_deterministic_algorithms(True)
    out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
    with pytest.raises(RuntimeError, match='ms_deform_attn_backward_cuda does not have a '
                       'deterministic implementation'):
        out.sum().backward()
    torch.use_deterministic_algorithms(True, warn_only=True)
    out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
    with pytest.warns(UserWarning, match='ms_deform_attn_backward_cuda does not have a '
                      'deterministic implementation'):
        out.sum().backward()
    assert value.grad is not None
    torch.use_deterministic_algorithms(False)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        ms_deform_attn(value, spatial_shapes, level_start_index, locations,
                       weights).sum().backward()

