"""The ...X detectors run their convolutions channels-last on CPU (``conv_memory_format``)."""
import copy
import os.path as osp

import pytest
import torch
from _helpers import REPO_CONFIGS
from _helpers.detectors import demo_batch, shrink_deformable_detr, tiny_detr_cfg
from mmdet.registry import MODELS
from mmengine.config import Config
from mmengine.registry import init_default_scope

import mmdet_detrx  # noqa: F401

init_default_scope('mmdet')


def _deformable_cfg():
    path = osp.join(REPO_CONFIGS, 'deformable_detr/deformable-detrx_r50_16xb2-50e_coco.py')
    return shrink_deformable_detr(Config.fromfile(path).model, num_layers=2, num_queries=20)


def _detr_cfg():
    cfg = tiny_detr_cfg()
    cfg.type = 'DETRX'
    return cfg


def _build(cfg, memory_format):
    cfg = copy.deepcopy(cfg)
    if memory_format is not None:
        cfg.conv_memory_format = memory_format
    torch.manual_seed(0)
    model = MODELS.build(cfg)
    model.init_weights()
    return model


def _backbone_input_layouts(model, inputs, samples):
    seen = []
    hook = model.backbone.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    try:
        with torch.no_grad():
            model(inputs, copy.deepcopy(samples), mode='tensor')
    finally:
        hook.remove()
    return seen


@pytest.mark.parametrize('make_cfg', [_deformable_cfg, _detr_cfg], ids=['deformable', 'detr'])
def test_cpu_default_is_channels_last_and_matches_nchw(make_cfg):
    cfg = make_cfg()
    default, nchw, forced = (_build(cfg, fmt) for fmt in (None, 'contiguous', 'channels_last'))
    state = default.state_dict()
    for model in (nchw, forced):
        model.load_state_dict(state, strict=True)
        model.eval()
    default.eval()
    assert default.conv_memory_format == 'auto'
    inputs, samples = demo_batch(default, [(3, 48, 64), (3, 40, 56)], num_items=[2, 1],
                                 num_classes=80, training=False)
    assert not inputs.is_contiguous(memory_format=torch.channels_last)  # mmdet hands NCHW
    assert _backbone_input_layouts(default, inputs, samples) == [True]
    assert _backbone_input_layouts(forced, inputs, samples) == [True]
    assert _backbone_input_layouts(nchw, inputs, samples) == [False]
    # The layout changes no parameter: checkpoints are the same tensors, laid out as before.
    assert all(p.is_contiguous() for p in default.parameters())
    assert list(default.state_dict()) == list(nchw.state_dict())
    with torch.no_grad():
        outputs = [m(inputs, copy.deepcopy(samples), mode='tensor') for m in (default, nchw)]
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-4, rtol=1e-4)


def test_channels_last_train_step_has_gradients():
    model = _build(_deformable_cfg(), None)
    model.train()
    inputs, samples = demo_batch(model, [(3, 48, 64), (3, 40, 56)], num_items=[2, 1],
                                 num_classes=80, training=True)
    losses = model.loss(inputs, samples)
    total = sum(v for k, v in losses.items() if 'loss' in k)
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_rejects_unknown_memory_format():
    with pytest.raises(ValueError, match='conv_memory_format'):
        _build(_deformable_cfg(), 'nhwc')
