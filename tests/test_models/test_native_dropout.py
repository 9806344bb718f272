"""The detectors' dropouts on the native hashed-mask dropout: swapped exactly, the state dict
kept, called in CPU training only, and the model otherwise unchanged."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _helpers import count_calls
from _helpers.detectors import (assert_same_predictions, build_detector, demo_batch,
                                tiny_deformable_detrx_cfg)
from mmcv.cnn.bricks.transformer import FFN
from mmengine.registry import init_default_scope

from mmdet_detrx.models.detectors import NativeDropout, native_dropout, use_native_dropout
from mmdet_detrx.ops import native_available

pytestmark = pytest.mark.skipif(not native_available(), reason='mmdet_detrx._C is not built')

init_default_scope('mmdet')


class _OtherDropout(nn.Dropout):
    pass


def test_swaps_exact_dropouts_and_keeps_the_state_dict():
    block = nn.Sequential(FFN(embed_dims=16, feedforward_channels=32, ffn_drop=0.1),
                          _OtherDropout(0.2), nn.Dropout2d(0.2))
    names = [name for name, _ in block.named_modules()]
    keys = list(block.state_dict())
    assert use_native_dropout(block) == 2  # FFN's two nn.Dropout
    assert use_native_dropout(block) == 2  # again: the same layers
    assert type(block[1]) is _OtherDropout and type(block[2]) is nn.Dropout2d
    assert [name for name, _ in block.named_modules()] == names
    assert list(block.state_dict()) == keys


def test_training_runs_the_op_and_eval_is_the_identity(monkeypatch):
    calls = count_calls(monkeypatch, torch.ops.detrx, 'dropout')
    layer = NativeDropout(0.3)
    x = torch.randn(50, 8)
    torch.manual_seed(0)
    out = layer(x)
    assert len(calls) == 1 and out.shape == x.shape
    torch.manual_seed(0)
    assert torch.equal(out, torch.ops.detrx.dropout(x, 0.3, int(
        torch.empty((), dtype=torch.int64).random_())))
    assert len(calls) == 2  # the layer's call and the one above
    assert layer.eval()(x) is x and len(calls) == 2


def test_deformable_detrx_trains_on_it_and_predicts_as_before(monkeypatch):
    ours = build_detector(tiny_deformable_detrx_cfg())
    plain = build_detector(tiny_deformable_detrx_cfg(native_dropout=False))
    assert ours.native_dropout and not plain.native_dropout
    dropouts = [m for m in plain.modules() if type(m) is nn.Dropout]
    assert len(dropouts) >= 4 and not any(type(m) is nn.Dropout for m in ours.modules())
    assert sum(type(m) is NativeDropout for m in ours.modules()) == len(dropouts)
    assert list(ours.state_dict()) == list(plain.state_dict())
    for key, value in plain.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key

    ours.eval()
    plain.eval()
    test_inputs, test_samples = demo_batch(ours, [(3, 48, 64)], num_items=[1], num_classes=80,
                                           training=False)
    with torch.no_grad():
        assert_same_predictions(ours.predict(test_inputs, copy.deepcopy(test_samples)),
                                plain.predict(test_inputs, copy.deepcopy(test_samples)))
    ours.train()
    plain.train()

    inputs, samples = demo_batch(ours, [(3, 48, 64), (3, 40, 56)], num_items=[2, 1],
                                 num_classes=80)
    calls = count_calls(monkeypatch, torch.ops.detrx, 'dropout')
    torch.manual_seed(3)
    losses = ours.loss(inputs, copy.deepcopy(samples))
    active = sum(m.p > 0 for m in dropouts)  # p = 0 returns its input, calling nothing
    assert len(calls) == active > 3
    loss = sum(v for k, v in losses.items() if 'loss' in k)
    loss.backward()
    assert len(calls) == 2 * active  # the backward: the same op on the gradient
    assert all(p.grad is None or p.grad.isfinite().all() for p in ours.parameters())

    # With F.dropout in the swapped layers' place, the same seed gives plain's losses exactly:
    # nothing else changed.
    monkeypatch.setattr(native_dropout, 'dropout', F.dropout)
    same_seed = []
    for model in (ours, plain):
        torch.manual_seed(3)
        same_seed.append(model.loss(inputs, copy.deepcopy(samples)))
    for key, value in same_seed[1].items():
        assert torch.equal(torch.as_tensor(same_seed[0][key]), torch.as_tensor(value)), key


def test_rejects_a_non_bool_native_dropout():
    with pytest.raises(TypeError, match='native_dropout'):
        build_detector(tiny_deformable_detrx_cfg(native_dropout=1))
