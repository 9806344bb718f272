"""Frozen BatchNorms folded into the convolution before them compute what the unfolded model
computes, keep its state dict, and skip the BN pass only when their convolution applied it.

Tolerances: the folded model runs different float32 arithmetic (the conv sums ``x * (W * s)``
instead of scaling ``sum(x * W)`` afterwards), a rounding difference of a few ulps per layer that
grows through ~50 layers; measured at most ~1e-6 of the feature scale, asserted at 1e-5 of it
(``_assert_close``).
"""
import copy
import io

import pytest
import torch
import torch.nn as nn
from _helpers import count_calls
from _helpers.detectors import (assert_same_predictions, build_detector, demo_batch,
                                tiny_deformable_detrx_cfg)
from mmdet.models.backbones import ResNet
from mmengine.registry import init_default_scope

from mmdet_detrx.models.backbones import BoTNet
from mmdet_detrx.models.detectors import FoldedBNConv2d, fold_frozen_batch_norms

init_default_scope('mmdet')

FROZEN_BN = dict(type='BN', requires_grad=False)
NUM_BNS = {18: 20, 50: 53}  # stem + 2 or 3 per block + one per downsample


def _randomize_bns(model, seed=0):
    """Non-trivial BN statistics and affine parameters, so a missed or doubled BN shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                size = (module.num_features, )
                module.running_mean.copy_(torch.randn(size, generator=gen))
                module.running_var.copy_(torch.rand(size, generator=gen) + 0.5)
                module.weight.copy_(torch.randn(size, generator=gen))
                module.bias.copy_(torch.randn(size, generator=gen))
    return model


def _resnet_pair(depth=18, training=False, **kwargs):
    """``(unfolded, folded)`` mmdet ResNets with the same random weights, in eval mode or in
    training mode (where ``norm_eval`` keeps the BNs in eval mode)."""
    kwargs.setdefault('norm_cfg', FROZEN_BN)
    torch.manual_seed(0)
    unfolded = _randomize_bns(ResNet(depth, **kwargs))
    folded = copy.deepcopy(unfolded)
    assert fold_frozen_batch_norms(folded) == NUM_BNS[depth]
    for model in (unfolded, folded):
        model.train(training)
    return unfolded, folded


def _input(memory_format=torch.contiguous_format, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 64, 96, generator=gen).contiguous(memory_format=memory_format)


def _assert_close(actual, expected):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5 * e.abs().max().item())


@pytest.fixture
def batch_norm_calls(monkeypatch):
    """The number of ``F.batch_norm`` calls (every BN forward) so far."""
    return count_calls(monkeypatch, torch.nn.functional, 'batch_norm')


@pytest.mark.parametrize('depth', [18, 50])
def test_every_bn_pairs_and_state_dict_is_unchanged(depth):
    torch.manual_seed(0)
    reference = ResNet(depth, norm_cfg=FROZEN_BN)
    torch.manual_seed(0)
    model = ResNet(depth, norm_cfg=FROZEN_BN)
    state = reference.state_dict()
    num_bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert fold_frozen_batch_norms(model) == num_bns == NUM_BNS[depth]
    assert [name for name, _ in model.named_modules()] == [
        name for name, _ in reference.named_modules()]
    # mmdet's init_cfg (Kaiming on 'Conv2d', Constant on '_BatchNorm') still reaches every
    # layer: it matches class names, which folding changes.
    for module in (reference, model):
        _randomize_bns(module)
        torch.manual_seed(1)
        module.init_weights()
    assert torch.equal(model.layer1[0].bn1.weight, torch.ones(64))
    assert list(model.state_dict()) == list(reference.state_dict())
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    model.load_state_dict(state, strict=True)
    reference.load_state_dict(model.state_dict(), strict=True)
    assert fold_frozen_batch_norms(model) == num_bns  # again: re-links the same pairs


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last],
                         ids=['nchw', 'channels_last'])
@pytest.mark.parametrize('depth', [18, 50])
def test_eval_matches_unfolded_without_running_bn(depth, memory_format, batch_norm_calls):
    unfolded, folded = _resnet_pair(depth)
    x = _input(memory_format)
    with torch.no_grad():
        expected = unfolded(x)
        assert len(batch_norm_calls) == NUM_BNS[depth]
        actual = folded(x)
    assert len(batch_norm_calls) == NUM_BNS[depth]  # not one more
    _assert_close(actual, expected)


def test_train_with_norm_eval_matches_unfolded_gradients():
    # Trainable gamma/beta under norm_eval (BN in eval mode, parameters learning), and a frozen
    # stem and first stage (nothing there requires grad: the cached fold).
    unfolded, folded = _resnet_pair(
        18, training=True, norm_cfg=dict(type='BN', requires_grad=True), norm_eval=True,
        frozen_stages=1)
    assert not folded.layer2[0].bn1.training
    x = _input()
    outputs = [model(x) for model in (unfolded, folded)]
    _assert_close(outputs[1], outputs[0])
    for model, outs in zip((unfolded, folded), outputs):
        sum((out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum()
            for out in outs).backward()
    grads = {name: param.grad for name, param in unfolded.named_parameters()
             if param.requires_grad}
    assert any('bn' in name for name in grads) and any('conv' in name for name in grads)
    for name, param in folded.named_parameters():
        if name in grads:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-4,
                                       atol=1e-5 * grads[name].abs().max().item(), msg=name)
        else:
            assert param.grad is None, name


def test_train_without_norm_eval_runs_bn_as_before(batch_norm_calls):
    unfolded, folded = _resnet_pair(18, training=True, norm_eval=False)
    x = _input()
    expected, actual = unfolded(x), folded(x)
    assert len(batch_norm_calls) == 2 * NUM_BNS[18]
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)
    for key, value in unfolded.state_dict().items():  # running statistics and batch counts
        assert torch.equal(folded.state_dict()[key], value), key


def test_cache_follows_parameter_changes():
    unfolded, folded = _resnet_pair(18)
    x = _input()
    with torch.no_grad():
        folded(x)
        for model in (unfolded, folded):  # in place: only the version counter changes
            model.layer1[0].bn1.running_var.mul_(4)
            model.conv1.weight.mul_(0.5)
        _assert_close(folded(x), unfolded(x))
        _, other = _resnet_pair(18)
        _randomize_bns(other, seed=3)
        for model in (unfolded, folded):
            model.load_state_dict(other.state_dict())
        _assert_close(folded(x), unfolded(x))
        # A write through .data (EMAHook's swap) bumps no version; the eval() that mmengine's
        # loops call after the swap drops the folded weights.
        for model in (unfolded, folded):
            model.layer1[0].bn1.running_var.data.mul_(3)
            model.layer1[0].conv1.weight.data.mul_(-1)
        folded.eval()
        _assert_close(folded(x), unfolded(x))
        folded.double()
        unfolded.double()
        actual = folded(x.double())
        assert actual[0].dtype == torch.float64
        _assert_close(actual, unfolded(x.double()))


def test_bf16_autocast_is_as_close_to_fp32_as_unfolded():
    unfolded, folded = _resnet_pair(18)
    x = _input(torch.channels_last)
    with torch.no_grad():
        fp32 = unfolded(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            bf16_unfolded, bf16_folded = unfolded(x), folded(x)
    for ref, plain, fused in zip(fp32, bf16_unfolded, bf16_folded):
        assert fused.dtype == plain.dtype == torch.bfloat16
        assert (fused.float() - ref).abs().max() <= 2 * (plain.float() - ref).abs().max()


def test_bn_runs_unless_its_convolution_folded():
    unfolded, folded = _resnet_pair(18)
    x = torch.randn(2, 64, 8, 8)
    block, reference = folded.layer1[0], unfolded.layer1[0]
    with torch.no_grad():
        assert torch.equal(block.bn1(x), reference.bn1(x))  # called alone: a BN
        folded_out = block.conv1(x)  # the conv applied the BN; its BN passes that through
        assert block.bn1(folded_out) is folded_out
        assert not torch.equal(block.bn1(folded_out), folded_out)  # a second call normalises
        _assert_close([block.conv1(x)], [reference.bn1(reference.conv1(x))])
        # A forward hook on the conv sees the raw convolution output.
        seen = []
        handle = block.conv1.register_forward_hook(lambda m, args, out: seen.append(out))
        block(x)
        handle.remove()
        _assert_close(seen, [reference.conv1(x)])


def test_replaced_bn_runs_unfolded():
    unfolded, folded = _resnet_pair(18)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(folded)  # new BN modules, same values
    converted.eval()
    x = _input()
    with torch.no_grad():
        _assert_close(converted(x), unfolded(x))


def test_deepcopy_and_pickle_keep_their_own_pairs():
    unfolded, folded = _resnet_pair(18)
    x = _input()
    with torch.no_grad():
        expected = unfolded(x)
        folded(x)  # fills the caches, which copies must not share
    buffer = io.BytesIO()
    torch.save(folded, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(folded), torch.load(buffer, weights_only=False)):
        conv = copied.layer1[0].conv1
        assert isinstance(conv, FoldedBNConv2d) and conv._bn_link[0] is copied.layer1[0]
        assert '_folded_cache' not in conv.__dict__
        with torch.no_grad():
            _assert_close(copied(x), expected)
            copied.layer1[0].bn1.running_var.mul_(4)  # the copy's BN, not the original's
            assert not torch.allclose(copied(x)[0], expected[0])
            _assert_close(folded(x), expected)


def test_botnet_folds_all_but_its_attention():
    kwargs = dict(depth=50, stem_channels=16, base_channels=16, norm_cfg=FROZEN_BN)
    torch.manual_seed(0)
    bot, reference = BoTNet(**kwargs), BoTNet(**kwargs)
    _randomize_bns(bot)
    reference.load_state_dict(bot.state_dict(), strict=True)
    # Every BN but the norm2 after each BoT block's attention.
    assert fold_frozen_batch_norms(bot) == NUM_BNS[50] - len(bot.layer4)
    assert all(type(block.norm2) is nn.BatchNorm2d for block in bot.layer4)
    bot.eval()
    reference.eval()
    x = _input()
    with torch.no_grad():
        _assert_close(bot(x), reference(x))


class _OtherConv(nn.Conv2d):
    """A convolution subclass (as DCN or SAC would be): its forward may differ."""


def test_other_convolutions_are_skipped():
    torch.manual_seed(0)
    dcn = ResNet(50, norm_cfg=FROZEN_BN, dcn=dict(type='DCNv2', deform_groups=1),
                 stage_with_dcn=(False, False, False, True))
    assert fold_frozen_batch_norms(dcn) == NUM_BNS[50] - len(dcn.layer4)
    model = ResNet(18, norm_cfg=FROZEN_BN)
    conv = model.layer1[0].conv1
    model.layer1[0].conv1 = _OtherConv(conv.in_channels, conv.out_channels, 3, padding=1,
                                       bias=False)
    assert fold_frozen_batch_norms(model) == NUM_BNS[18] - 1
    assert type(model.layer1[0].conv1) is _OtherConv
    assert type(model.layer1[0].bn1) is nn.BatchNorm2d


def test_deformable_detrx_predicts_the_same_folded(batch_norm_calls):
    folded = build_detector(tiny_deformable_detrx_cfg())
    unfolded = build_detector(tiny_deformable_detrx_cfg(fold_frozen_bn=False))
    assert folded.fold_frozen_bn and not unfolded.fold_frozen_bn
    _randomize_bns(unfolded)
    folded.load_state_dict(unfolded.state_dict(), strict=True)
    unfolded.load_state_dict(folded.state_dict(), strict=True)
    inputs, samples = demo_batch(folded, [(3, 48, 64), (3, 40, 56)], num_items=[2, 1],
                                 num_classes=80, training=False)
    folded.eval()
    unfolded.eval()
    with torch.no_grad():
        expected = unfolded.predict(inputs, copy.deepcopy(samples))
        num_calls = len(batch_norm_calls)
        actual = folded.predict(inputs, copy.deepcopy(samples))
    assert num_calls == NUM_BNS[18] and len(batch_norm_calls) == num_calls
    assert_same_predictions(actual, expected)


def test_rejects_a_non_bool_fold_frozen_bn():
    with pytest.raises(TypeError, match='fold_frozen_bn'):
        build_detector(tiny_deformable_detrx_cfg(fold_frozen_bn='yes'))
