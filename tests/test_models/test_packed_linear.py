"""Packed linear layers compute what ``nn.Linear`` computes, run oneDNN only in CPU float32
inference, keep the state dict and init, and notice weight changes.

Tolerance (:func:`_assert_linear_close`): oneDNN sums each output's ``K = in_features`` products
in another order than MKL. Each result is within ``K * eps * (|x| @ |W|^T + |b|)`` of the exact
value (the classical bound for a float32 dot product), so the two are within twice that.
"""
import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _helpers import count_calls
from _helpers.detectors import (assert_same_predictions, build_detector, demo_batch,
                                tiny_deformable_detrx_cfg)
from mmcv.cnn import Linear as MMCVLinear
from mmcv.cnn.bricks.transformer import FFN
from mmengine.model import BaseModule
from mmengine.registry import init_default_scope

from mmdet_detrx.models.detectors import PackedLinear, pack_linears, packed_linear

init_default_scope('mmdet')

ROWS = packed_linear.MIN_ROWS  # the fewest rows that take oneDNN


@pytest.fixture
def onednn_calls(monkeypatch):
    """The number of ``torch.ops.mkldnn._linear_pointwise`` calls so far."""
    return count_calls(monkeypatch, torch.ops.mkldnn, '_linear_pointwise')


@pytest.fixture
def pack_calls(monkeypatch):
    """The number of weight reorders (packings) so far."""
    return count_calls(monkeypatch, torch.ops.mkldnn, '_reorder_linear_weight')


def _pair(in_features=32, out_features=48, bias=True, seed=0):
    """``(plain, packed)`` linear layers with the same random weights."""
    torch.manual_seed(seed)
    plain = nn.Linear(in_features, out_features, bias=bias)
    packed = copy.deepcopy(plain)
    assert pack_linears(packed) == 1 and type(packed) is PackedLinear
    return plain, packed


def _input(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _transposed(layer):
    """A bias-free layer computing ``x @ layer.weight`` (the input's gradient of ``layer``)."""
    transposed = nn.Linear(layer.out_features, layer.in_features, bias=False)
    transposed.weight.data = layer.weight.detach().t().contiguous()
    return transposed


def _assert_linear_close(actual, x, layer):
    expected = F.linear(x, layer.weight, layer.bias)
    bound = x.abs() @ layer.weight.abs().t()
    if layer.bias is not None:
        bound = bound + layer.bias.abs()
    eps = torch.finfo(torch.float32).eps
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert ((actual - expected).abs() <= 2 * layer.in_features * eps * bound).all()


@pytest.mark.parametrize('bias', [True, False], ids=['bias', 'no_bias'])
@pytest.mark.parametrize('shape', [(ROWS, 32), (2, ROWS // 2 + 3, 32)], ids=['2d', '3d'])
def test_no_grad_output_is_oneDNN_and_equals_linear(shape, bias, onednn_calls):
    plain, packed = _pair(bias=bias)
    x = _input(*shape)
    with torch.no_grad():
        actual = packed(x)
    assert len(onednn_calls) == 1
    _assert_linear_close(actual, x, plain)
    with torch.inference_mode():
        _assert_linear_close(packed(x), x, plain)
    # Without grad-requiring tensors, grad mode on takes oneDNN too.
    packed.requires_grad_(False)
    _assert_linear_close(packed(x), x, plain)
    assert len(onednn_calls) == 3


@pytest.mark.parametrize('bias', [True, False], ids=['bias', 'no_bias'])
@pytest.mark.parametrize('shape', [(2 * ROWS, 32), (2, ROWS, 32)], ids=['2d', '3d'])
def test_training_runs_oneDNN_with_nn_linears_gradients(shape, bias, onednn_calls):
    """The forward and the input's gradient are oneDNN's (close to nn.Linear's); the weight's
    and bias's gradients are addmm's GEMM and sum in its layouts, so for the same upstream
    gradient they are nn.Linear's, bit for bit."""
    plain, packed = _pair(bias=bias)
    inputs = [_input(*shape).requires_grad_(True) for _ in range(2)]
    outputs = [layer(x) for layer, x in zip((plain, packed), inputs)]
    assert len(onednn_calls) == 1 and outputs[1].grad_fn is not None
    _assert_linear_close(outputs[1], inputs[1], plain)
    upstream = torch.linspace(-1, 1, outputs[0].numel()).reshape(outputs[0].shape)
    for out in outputs:
        (out * upstream).sum().backward()
    assert len(onednn_calls) == 2  # the input's gradient: upstream @ weight
    _assert_linear_close(inputs[1].grad, upstream, _transposed(plain))
    assert torch.equal(packed.weight.grad, plain.weight.grad)
    if bias:
        assert torch.equal(packed.bias.grad, plain.bias.grad)
    # Frozen parameters and an input that requires grad; and only the parameters.
    packed.requires_grad_(False)
    x = _input(*shape).requires_grad_(True)
    packed(x).sum().backward()
    assert x.grad is not None and len(onednn_calls) == 4
    packed.requires_grad_(True)
    packed.zero_grad()
    packed(_input(*shape)).sum().backward()
    assert packed.weight.grad.abs().sum() > 0 and len(onednn_calls) == 5


def test_training_gradients_follow_weight_changes(pack_calls):
    """The packed ``weight.t()`` of the input's gradient is repacked after an optimizer step."""
    plain, packed = _pair()
    optimizers = [torch.optim.SGD(layer.parameters(), lr=0.5) for layer in (plain, packed)]
    upstream = torch.linspace(-1, 1, ROWS * 48).reshape(ROWS, 48)
    for step in range(2):
        inputs = [_input(ROWS, 32, seed=step).requires_grad_(True) for _ in range(2)]
        expected = _transposed(plain)  # the weight before this step's update
        for layer, x, optimizer in zip((plain, packed), inputs, optimizers):
            optimizer.zero_grad()
            (layer(x) * upstream).sum().backward()
            optimizer.step()
        _assert_linear_close(inputs[1].grad, upstream, expected)
        assert len(pack_calls) == 2 * (step + 1)  # weight and weight.t(), once per step
    torch.testing.assert_close(packed.weight, plain.weight, rtol=0, atol=1e-6)


def test_training_output_takes_an_in_place_relu_and_double_backward():
    plain, packed = _pair()
    x = _input(2, ROWS, 32).requires_grad_(True)
    out = packed(x)
    assert out._base is None
    relu = torch.relu_(out)
    assert type(relu.grad_fn).__name__ == 'ReluBackward0'
    (grad_x, ) = torch.autograd.grad(relu.pow(2).sum(), x, create_graph=True)
    grad_x.sum().backward()  # the backward's GEMMs are differentiable
    assert packed.weight.grad is not None and packed.weight.grad.abs().sum() > 0


def test_batched_plain_training_output_is_not_a_view(monkeypatch):
    """nn.Linear's path (here: too few rows for oneDNN): an in-place ReLU after the layer
    (mmcv's FFN) costs no ``CopySlices`` rebuild of the output in the backward; values and
    gradients stay nn.Linear's, bit for bit."""
    monkeypatch.setattr(packed_linear, 'MIN_ROWS', 4 * ROWS)
    plain, packed = _pair()
    x = _input(2, ROWS, 32)
    outputs = [layer(x) for layer in (plain, packed)]
    assert outputs[0]._base is not None and outputs[1]._base is None  # F.linear's is a view
    assert torch.equal(outputs[1], outputs[0])
    relus = [torch.relu_(out) for out in outputs]
    assert type(relus[0].grad_fn).__name__ == 'AsStridedBackward0'
    assert type(relus[1].grad_fn).__name__ == 'ReluBackward0'
    weight = torch.linspace(-1, 1, relus[0].numel()).reshape(relus[0].shape)
    for out in relus:
        (out * weight).sum().backward()
    assert torch.equal(packed.weight.grad, plain.weight.grad)
    assert torch.equal(packed.bias.grad, plain.bias.grad)


@pytest.mark.parametrize('case', ['autocast_bf16', 'float64', 'bfloat16', 'few_rows',
                                  'few_outputs', 'transposed', 'jit_trace', 'torch_export'])
def test_other_cases_run_nn_linear(case, onednn_calls, pack_calls):
    out_features = packed_linear.MIN_OUT_FEATURES - (case == 'few_outputs')
    plain, packed = _pair(out_features=out_features)
    x = _input(32, ROWS).t() if case == 'transposed' else _input(ROWS, 32)
    if case in ('float64', 'bfloat16'):
        dtype = getattr(torch, case)
        plain.to(dtype)
        packed.to(dtype)
        x = x.to(dtype)
    elif case == 'few_rows':
        x = x[:-1]
    with torch.no_grad():
        if case == 'autocast_bf16':
            with torch.autocast('cpu', dtype=torch.bfloat16):
                actual, expected = packed(x), plain(x)
        elif case == 'jit_trace':  # torch.onnx.export traces the same way
            traced = torch.jit.trace(packed, x, check_trace=False)
            assert 'mkldnn' not in str(traced.graph)
            actual, expected = traced(x), plain(x)
        elif case == 'torch_export':  # also the ONNX exporter's default (dynamo=True)
            exported = torch.export.export(packed, (x, ))
            assert 'mkldnn' not in str(exported.graph)
            actual, expected = exported.module()(x), plain(x)
        else:
            actual, expected = packed(x), plain(x)
    assert not onednn_calls and not pack_calls  # not even tried (and failed)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize('case', ['forward_ad', 'torch_func'])
def test_forward_ad_and_torch_func_run_nn_linear(case, onednn_calls):
    """Their formulas (jvp, vmap) are nn.Linear's; the training path defines a backward only."""
    plain, packed = _pair()
    x = _input(ROWS, 32)
    tangent = torch.ones_like(x)
    results = []
    for layer in (plain, packed):
        if case == 'forward_ad':
            with torch.autograd.forward_ad.dual_level():
                out = layer(torch.autograd.forward_ad.make_dual(x, tangent))
                results.append(torch.autograd.forward_ad.unpack_dual(out).tangent)
        else:
            results.append(torch.func.grad(lambda w: torch.func.functional_call(
                layer, {'weight': w, 'bias': layer.bias}, (x, )).sum())(layer.weight))
    assert not onednn_calls
    assert torch.equal(results[1], results[0])


def test_cache_follows_weight_changes(pack_calls):
    plain, packed = _pair()
    x = _input(ROWS, 32)
    with torch.no_grad():
        packed(x)
        packed(x)
        assert len(pack_calls) == 1  # packed once, reused
        for layer in (plain, packed):  # in place: only the version counter changes
            layer.weight.mul_(-2)
        _assert_linear_close(packed(x), x, plain)
        other, _ = _pair(seed=3)
        for layer in (plain, packed):
            layer.load_state_dict(other.state_dict())
        _assert_linear_close(packed(x), x, plain)
        assert len(pack_calls) == 3
        packed.double()  # float64: nn.Linear's path
        assert torch.equal(packed(x.double()), plain.double()(x.double()))
        packed.float()  # new storage, which may be at the old one's address
        plain.float()
        _assert_linear_close(packed(x), x, plain)
        assert len(pack_calls) == 4
        # A new Parameter on the same storage has its own version counter, which may reach
        # the old one's value after an in-place change.
        weight = nn.Parameter(packed.weight.data)
        weight.mul_(3)
        while weight._version < packed.weight._version:
            weight.add_(0)
        assert weight._version == packed.weight._version
        packed.weight = weight
        plain.weight.mul_(3)
        _assert_linear_close(packed(x), x, plain)
        assert len(pack_calls) == 5
        # A write through .data (EMAHook's swap) bumps no version; the eval() that mmengine's
        # loops call after the swap drops the packed weight.
        for layer in (plain, packed):
            layer.weight.data.copy_(other.weight)
        packed.eval()
        _assert_linear_close(packed(x), x, plain)
        assert len(pack_calls) == 6


def test_deepcopy_and_pickle_drop_the_packed_weight():
    plain, packed = _pair()
    x = _input(ROWS, 32)
    with torch.no_grad():
        packed(x)  # the opaque oneDNN weight cannot be copied or pickled
        assert '_packed_weight' in packed.__dict__
        buffer = io.BytesIO()
        torch.save(packed, buffer)
        buffer.seek(0)
        for copied in (copy.deepcopy(packed), torch.load(buffer, weights_only=False)):
            assert type(copied) is PackedLinear and '_packed_weight' not in copied.__dict__
            _assert_linear_close(copied(x), x, plain)
            copied.weight.mul_(2)  # the copy's weight, not the original's
            assert not torch.allclose(copied(x), packed(x))
            _assert_linear_close(packed(x), x, plain)


def test_a_failing_op_warns_once_and_runs_nn_linear(monkeypatch):
    plain, packed = _pair()
    x = _input(ROWS, 32)
    calls = []

    def failing(*args):
        calls.append(1)
        raise RuntimeError('could not create a primitive descriptor')

    monkeypatch.setattr(torch.ops.mkldnn, '_linear_pointwise', failing)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        assert torch.equal(packed(x), plain(x))
        assert torch.equal(packed(x), plain(x))
    assert len(calls) == 1
    assert len(caught) == 1 and 'mkldnn._linear_pointwise' in str(caught[0].message)


def test_a_failing_op_in_the_backward_warns_and_computes_the_gradient(monkeypatch):
    plain, packed = _pair()
    inputs = [_input(ROWS, 32).requires_grad_(True) for _ in range(2)]
    outputs = [layer(x) for layer, x in zip((plain, packed), inputs)]

    def failing(*args):
        raise RuntimeError('could not create a primitive descriptor')

    monkeypatch.setattr(torch.ops.mkldnn, '_linear_pointwise', failing)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        for out in outputs:
            out.sum().backward()
    assert len(caught) == 1 and 'mkldnn._linear_pointwise' in str(caught[0].message)
    assert torch.equal(inputs[1].grad, inputs[0].grad)  # mm, as nn.Linear's backward
    assert torch.equal(packed.weight.grad, plain.weight.grad)
    assert torch.equal(packed(inputs[1]), plain(inputs[1]))  # nn.Linear from then on


def test_a_wrong_input_width_raises_nn_linears_error(onednn_calls):
    _, packed = _pair()
    with torch.no_grad(), pytest.raises(RuntimeError, match='cannot be multiplied'):
        packed(_input(ROWS, 33))
    assert not onednn_calls and not packed.__dict__.get('_onednn_failed')


class _OtherLinear(nn.Linear):
    """A linear subclass whose forward may differ."""


class _Block(BaseModule):

    def __init__(self):
        super().__init__(init_cfg=dict(type='Constant', layer='Linear', val=0.5, bias=0.25))
        self.ffn = FFN(embed_dims=16, feedforward_channels=32)  # mmcv Linear x 2
        self.proj = nn.Linear(16, 8)
        self.other = _OtherLinear(16, 8)
        self.attn = nn.MultiheadAttention(16, 2)  # out_proj: NonDynamicallyQuantizableLinear


def test_packs_exact_linears_and_keeps_state_dict_and_init():
    torch.manual_seed(0)
    reference, block = _Block(), _Block()
    block.load_state_dict(reference.state_dict())
    assert pack_linears(block) == 3
    assert pack_linears(block) == 3  # again: the same layers
    assert isinstance(block.ffn.layers[1], MMCVLinear) and type(block.other) is _OtherLinear
    assert type(block.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert [name for name, _ in block.named_modules()] == [
        name for name, _ in reference.named_modules()]
    assert list(block.state_dict()) == list(reference.state_dict())
    block.load_state_dict(reference.state_dict(), strict=True)
    # mmengine's init_cfg matches 'Linear' against the class name and its direct bases' names.
    for module in (reference, block):
        module.init_weights()
    for key, value in reference.state_dict().items():
        assert torch.equal(block.state_dict()[key], value), key
    assert torch.equal(block.proj.weight, torch.full((8, 16), 0.5))


def test_deformable_detrx_predicts_the_same_packed(monkeypatch, onednn_calls):
    packed = build_detector(tiny_deformable_detrx_cfg())
    plain = build_detector(tiny_deformable_detrx_cfg(pack_linear=False))
    assert packed.pack_linear and not plain.pack_linear
    linears = [m for m in plain.modules() if type(m) in (nn.Linear, MMCVLinear)]
    assert len(linears) > 10 and not any(
        type(m) in (nn.Linear, MMCVLinear) for m in packed.modules())
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == len(linears)
    assert list(packed.state_dict()) == list(plain.state_dict())
    for key, value in plain.state_dict().items():  # init_weights reached the packed layers
        assert torch.equal(packed.state_dict()[key], value), key
    inputs, samples = demo_batch(packed, [(3, 48, 64), (3, 40, 56)], num_items=[2, 1],
                                 num_classes=80, training=False)
    # Tiny inputs and 4 box outputs take oneDNN too.
    monkeypatch.setattr(packed_linear, 'MIN_ROWS', 1)
    monkeypatch.setattr(packed_linear, 'MIN_OUT_FEATURES', 1)
    packed.eval()
    plain.eval()
    layer_calls = []
    for module in packed.modules():
        if isinstance(module, PackedLinear):
            module.register_forward_pre_hook(
                lambda module, args: layer_calls.append(args[0].is_contiguous()))
    with torch.no_grad():
        expected = plain.predict(inputs, copy.deepcopy(samples))
        assert not onednn_calls
        actual = packed.predict(inputs, copy.deepcopy(samples))
    # All but reference_points_fc, whose input (the query embedding expanded over the batch) is
    # not contiguous.
    assert sum(layer_calls) == len(layer_calls) - 1 > 10 and len(onednn_calls) == sum(layer_calls)
    assert_same_predictions(actual, expected)


def test_rejects_a_non_bool_pack_linear():
    with pytest.raises(TypeError, match='pack_linear'):
        build_detector(tiny_deformable_detrx_cfg(pack_linear='yes'))
