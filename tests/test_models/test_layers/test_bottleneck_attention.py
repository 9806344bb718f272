import pytest
import torch

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
])
def test_rejects_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        BottleneckAttention(**kwargs)


def test_rejects_wrong_channels():
    with pytest.raises(ValueError, match='x must be'):
        BottleneckAttention(32)(torch.randn(1, 16, 4, 4))
