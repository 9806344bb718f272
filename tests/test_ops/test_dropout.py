"""The native hashed-mask dropout: its law, its determinism, its backward, and when
``mmdet_detrx.ops.dropout`` falls back to ``F.dropout``."""
import math

import numpy
import pytest
import torch
import torch.nn.functional as F

from mmdet_detrx.ops import dropout, native_available

pytestmark = pytest.mark.skipif(not native_available(), reason='mmdet_detrx._C is not built')

N = 1 << 20


def op(x, p, seed):
    return torch.ops.detrx.dropout(x, p, seed)


def keep_mask(x, p, seed):
    return op(torch.ones_like(x), p, seed) != 0


@pytest.mark.parametrize('p', [0.1, 0.5, 0.9])
def test_each_element_is_kept_with_probability_one_minus_p_and_scaled(p):
    x = torch.randn(N)
    out = op(x, p, 7)
    kept = out != 0
    # Binomial(N, 1 - p): 6 standard deviations.
    assert abs(kept.sum().item() - N * (1 - p)) < 6 * math.sqrt(N * p * (1 - p))
    scale = torch.tensor(1 / (1 - p), dtype=torch.float32)
    assert torch.equal(out[kept], x[kept] * scale)


def test_neighbouring_elements_are_independent():
    # Elements 2k and 2k + 1 share one 64-bit draw, 2k + 1 and 2k + 2 come from two draws.
    p = 0.5
    kept = keep_mask(torch.empty(N), p, 11).float()
    for first, second in ((kept[0::2], kept[1::2]), (kept[1:-1:2], kept[2::2])):
        both = (first * second).mean().item()
        assert abs(both - 0.25) < 6 * math.sqrt(0.25 * 0.75 / first.numel())


def test_seeds_give_different_masks_and_the_same_seed_the_same():
    x = torch.empty(4096)
    assert torch.equal(keep_mask(x, 0.3, 1), keep_mask(x, 0.3, 1))
    agree = (keep_mask(x, 0.5, 1) == keep_mask(x, 0.5, 2)).float().mean().item()
    assert 0.4 < agree < 0.6


def test_mask_is_the_same_for_any_thread_count():
    x = torch.randn(3 * N + 1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(x, 0.2, 5)
        torch.set_num_threads(max(2, threads))
        many = op(x, 0.2, 5)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes_take_the_float32_mask_and_round_once(dtype):
    x = torch.randn(10000, dtype=torch.float64)
    out = op(x.to(dtype), 0.3, 3)
    assert out.dtype == dtype
    assert torch.equal(out != 0, keep_mask(torch.empty(10000), 0.3, 3))
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.tensor(1 / 0.7, dtype=compute)
    assert torch.equal(out, (x.to(dtype).to(compute) * scale * (out != 0)).to(dtype))


def test_shape_and_strides_do_not_change_the_mask_of_the_row_major_order():
    x = torch.randn(64, 48)
    assert torch.equal(op(x.t(), 0.4, 9), op(x.t().contiguous(), 0.4, 9))
    assert torch.equal(op(x, 0.4, 9).view(-1), op(x.view(-1), 0.4, 9))
    assert op(x.t(), 0.4, 9).is_contiguous()


def test_p_one_multiplies_by_zero_and_nan_stays_nan():
    x = torch.tensor([1.0, -2.0, float('nan'), float('inf')] * 64)
    out = op(x, 1.0, 0)
    assert torch.equal(out[:2], torch.zeros(2)) and out[2].isnan() and out[3].isnan()
    # A dropped NaN is NaN * 0 (as torch's mask multiply), a kept one NaN * scale.
    assert op(torch.full((1000, ), float('nan')), 0.5, 1).isnan().all()


def test_empty_input():
    assert op(torch.empty(0, 3), 0.5, 1).shape == (0, 3)


@pytest.mark.parametrize('p', [-0.1, 1.5, float('nan'), float('inf')])
def test_a_bad_probability_is_refused_naming_p(p):
    with pytest.raises(ValueError, match='p must be a probability'):
        op(torch.ones(3), p, 0)
    with pytest.raises(ValueError, match='p must be in'):
        dropout(torch.ones(3), p)


def test_p_may_be_any_real_number_type():
    x = torch.randn(1000)
    torch.manual_seed(0)
    expected = dropout(x, 0.25)
    torch.manual_seed(0)
    assert torch.equal(dropout(x, numpy.float32(0.25)), expected)
    with pytest.raises(ValueError, match='p must be in'):
        dropout(x, True)
    with pytest.raises(ValueError, match='p must be in'):
        dropout(x, '0.5')


def test_an_integer_input_is_refused():
    with pytest.raises(TypeError, match='floating-point'):
        op(torch.ones(3, dtype=torch.int64), 0.5, 0)


def test_backward_is_the_same_mask_and_scale():
    x = torch.randn(1000, 7, requires_grad=True)
    out = op(x, 0.25, 13)
    grad = torch.randn_like(out)
    out.backward(grad)
    assert torch.equal(x.grad, op(grad, 0.25, 13))
    assert torch.equal(x.grad != 0, out != 0)


def test_gradcheck_and_gradgradcheck():
    x = torch.randn(40, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: op(t, 0.3, 17), (x, ))
    assert torch.autograd.gradgradcheck(lambda t: op(t, 0.3, 17), (x, ))


def test_opcheck():
    # Schema, fake kernel (torch.compile / export), autograd registration.
    torch.library.opcheck(torch.ops.detrx.dropout.default,
                          (torch.randn(33, 5, requires_grad=True), 0.2, 3))


def test_dropout_draws_its_seed_from_torchs_generator():
    x = torch.randn(5000)
    torch.manual_seed(0)
    first = dropout(x, 0.5)
    torch.manual_seed(0)
    assert torch.equal(first, dropout(x, 0.5))
    generator = torch.Generator().manual_seed(1)
    again = torch.Generator().manual_seed(1)
    assert torch.equal(dropout(x, 0.5, generator=generator), dropout(x, 0.5, generator=again))
    assert not torch.equal(first, dropout(x, 0.5))


def test_identity_cases_return_the_input():
    x = torch.randn(10)
    assert dropout(x, 0.5, training=False) is x
    assert dropout(x, 0.0) is x


@pytest.mark.parametrize('case', ['inplace', 'meta', 'int', 'compiling'])
def test_other_cases_run_f_dropout(case, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.ops.detrx, 'dropout', lambda *a: calls.append(a))
    x = torch.randn(100)
    if case == 'inplace':
        out = dropout(x, 0.5, inplace=True)
        assert out is x
    elif case == 'meta':
        assert dropout(x.to('meta'), 0.5).device.type == 'meta'
    elif case == 'int':
        with pytest.raises(RuntimeError):  # F.dropout's own error for integer tensors
            dropout(torch.ones(3, dtype=torch.int64), 0.5)
    else:
        monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
        torch.manual_seed(0)
        out = dropout(x, 0.5)
        torch.manual_seed(0)
        assert torch.equal(out, F.dropout(x, 0.5))
    assert not calls


def test_activation_checkpointing_recomputes_the_same_mask():
    # torch.utils.checkpoint restores the CPU generator before recomputing the forward, so the
    # recomputed call draws the same seed, hence the same mask.
    x = torch.randn(4096, requires_grad=True)
    torch.manual_seed(0)
    dropout(x, 0.5).sum().backward()
    expected = x.grad.clone()
    x.grad = None
    for use_reentrant in (False, True):
        torch.manual_seed(0)
        torch.utils.checkpoint.checkpoint(lambda t: dropout(t * 1.0, 0.5), x,
                                          use_reentrant=use_reentrant).sum().backward()
        assert torch.equal(x.grad, expected)
        x.grad = None
