import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mmdet_detrx.models.layers.bottleneck_attention import (BottleneckAttention,
                                                            relative_position_index)


def naive_bottleneck_attention(module, x):
    """Explicit O(N^2) BoTNet attention: one logit per (query, key) pair, written out."""
    batch, channels, height, width = x.shape
    heads, dims, max_size = module.num_heads, module.head_dims, module.max_size
    qkv = torch.nn.functional.conv2d(x, module.qkv.weight, module.qkv.bias)
    q, k, v = qkv.split(channels, dim=1)  # each (B, C, H, W); channel = head * dims + c

    def token(t, b, head, y, x_):
        return t[b, head * dims:(head + 1) * dims, y, x_]

    def position(y, x_, ky, kx):
        if module.pos_embed == 'relative':
            dy = min(max(ky - y, -(max_size - 1)), max_size - 1) + max_size - 1
            dx = min(max(kx - x_, -(max_size - 1)), max_size - 1) + max_size - 1
            return module.pos_h[dy] + module.pos_w[dx]
        return module.pos_h[min(ky, max_size - 1)] + module.pos_w[min(kx, max_size - 1)]

    pixels = [(y, x_) for y in range(height) for x_ in range(width)]
    out = torch.zeros_like(x)
    for b in range(batch):
        for head in range(heads):
            for y, x_ in pixels:
                query = token(q, b, head, y, x_)
                logits = torch.stack([
                    query @ (token(k, b, head, ky, kx) + position(y, x_, ky, kx))
                    for ky, kx in pixels
                ]) * dims**-0.5
                weights = logits.softmax(0)
                values = torch.stack([token(v, b, head, ky, kx) for ky, kx in pixels])
                out[b, head * dims:(head + 1) * dims, y, x_] = weights @ values
    return out


@pytest.mark.parametrize('pos_embed', ['relative', 'absolute'])
@pytest.mark.parametrize('size, max_size', [((4, 6), 8), ((5, 3), 5), ((6, 7), 3)])
def test_matches_naive_implementation(pos_embed, size, max_size):
    # (6, 7) with max_size=3 exercises the clipping of offsets/positions beyond the tables.
    torch.manual_seed(0)
    module = BottleneckAttention(16, num_heads=2, pos_embed=pos_embed, max_size=max_size,
                                 qkv_bias=True).double()
    module.init_weights()
    x = torch.randn(2, 16, *size, dtype=torch.double)
    torch.testing.assert_close(module(x), naive_bottleneck_attention(module, x))


def test_position_logits_change_the_output():
    torch.manual_seed(0)
    with_pos = BottleneckAttention(16, num_heads=2, pos_embed='relative')
    with_pos.init_weights()
    without_pos = BottleneckAttention(16, num_heads=2, pos_embed='none')
    without_pos.qkv.load_state_dict(with_pos.qkv.state_dict())
    x = torch.randn(1, 16, 5, 6)
    assert not torch.allclose(with_pos(x), without_pos(x), atol=1e-4)


def test_relative_position_index():
    index = relative_position_index(5, max_size=3)
    for i in range(5):
        for j in range(5):
            assert index[i, j] == min(max(j - i, -2), 2) + 2


@pytest.mark.parametrize('size', [(1, 1), (3, 17), (25, 38)])
def test_any_input_size(size):
    module = BottleneckAttention(32, num_heads=4, max_size=16)
    module.init_weights()
    x = torch.randn(2, 32, *size)
    out = module(x)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_gradients_reach_every_parameter():
    module = BottleneckAttention(8, num_heads=2, max_size=4).double()
    module.init_weights()
    x = torch.randn(1, 8, 3, 5, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x, ))
    module(x).square().sum().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_bfloat16():
    torch.manual_seed(0)
    module = BottleneckAttention(64, num_heads=4)
    module.init_weights()
    x = torch.randn(2, 64, 9, 13)
    expected = module(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        autocast_out = module(x)
    bf16_out = module.to(torch.bfloat16)(x.to(torch.bfloat16))
    for out in (autocast_out, bf16_out):
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)


@pytest.mark.parametrize('kwargs, argument', [
    (dict(embed_dims=30, num_heads=4), 'num_heads'),
    (dict(embed_dims=32, num_heads=0), 'num_heads'),
    (dict(embed_dims=32, pos_embed='sine'), 'pos_embed'),
    (dict(embed_dims=32, max_size=0), 'max_size'),
    (dict(embed_dims=32, query_chunk_size=0), 'query_chunk_size'),
    (dict(embed_dims=32, query_chunk_size=2.5), 'query_chunk_size'),
])
def test_rejects_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        BottleneckAttention(**kwargs)


def test_rejects_wrong_channels():
    with pytest.raises(ValueError, match='x must be'):
        BottleneckAttention(32)(torch.randn(1, 16, 4, 4))


@pytest.mark.parametrize('pos_embed', ['relative', 'absolute', 'none'])
@pytest.mark.parametrize('chunk', [1, 7, 13, 29])
def test_query_chunks_give_the_unchunked_output_and_gradients(pos_embed, chunk):
    # 7 x 6 map: chunk 1 and 7 -> one row per chunk, 13 -> two rows, 29 -> four rows with a
    # shorter last chunk; max_size=4 adds clipped offsets.
    torch.manual_seed(0)
    whole = BottleneckAttention(16, num_heads=2, pos_embed=pos_embed, max_size=4,
                                qkv_bias=True, query_chunk_size=None).double()
    whole.init_weights()
    chunked = BottleneckAttention(16, num_heads=2, pos_embed=pos_embed, max_size=4,
                                  qkv_bias=True, query_chunk_size=chunk).double()
    chunked.load_state_dict(whole.state_dict())
    assert chunked.rows_per_chunk(7, 6) == max(1, chunk // 6)
    x = torch.randn(2, 16, 7, 6, dtype=torch.double, requires_grad=True)
    outs, grads = [], []
    for module in (whole, chunked):
        out = module(x)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), [x, *module.parameters()]))
    torch.testing.assert_close(outs[1], outs[0])
    for g_chunked, g_whole in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_chunked, g_whole)


class LargestTensor(TorchDispatchMode):
    """Records the most elements any op output had."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out, )):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_query_chunks_bound_the_quadratic_buffers():
    heads, size = 2, 16  # N = 256 tokens
    module = BottleneckAttention(16, num_heads=heads, query_chunk_size=2 * size)
    module.init_weights()
    x = torch.randn(1, 16, size, size)
    largest = {}
    with torch.no_grad():
        for chunk in (None, 2 * size):
            module.query_chunk_size = chunk
            mode = LargestTensor()
            with mode:
                module(x)
            largest[chunk] = mode.numel
    tokens = size * size
    assert largest[None] >= heads * tokens * tokens  # the (B, heads, N, N) bias
    assert largest[2 * size] <= heads * (2 * size) * tokens  # (B, heads, chunk, N) at most


def test_query_chunk_size_changes_no_state_dict_key():
    keys = {chunk: list(BottleneckAttention(32, query_chunk_size=chunk).state_dict())
            for chunk in (None, 1, 1024)}
    assert keys[None] == keys[1] == keys[1024] == ['pos_h', 'pos_w', 'qkv.weight']
