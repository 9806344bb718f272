"""Backbone test helpers: timm reference checkpoints, parameter counts, and the checks that
ViT and TNT (and other token backbones) pass the same way."""
import os.path as osp

import pytest
import torch
from mmdet.registry import MODELS
from mmengine.config import Config

from . import REPO_ROOT


@pytest.fixture(scope='module')
def timm():
    """The timm package (import this fixture into a test module to use it)."""
    import warnings
    with warnings.catch_warnings():  # torchvision without its C++ image ops says so
        warnings.simplefilter('ignore')
        import timm
    return timm


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def randomize_(model, seed=0):
    """Random values in every tensor (LayerNorms included), so any swapped key shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    return model


def timm_checkpoint(timm, name, tmp_path, seed=0, **kwargs):
    """A randomized timm model ``name`` (eval mode) and the path of its saved state dict."""
    model = randomize_(timm.create_model(name, pretrained=False, **kwargs), seed).eval()
    path = str(tmp_path / f'{name}.pth')
    torch.save(model.state_dict(), path)
    return model, path


def assert_equals_timm_forward_features(timm, tmp_path, backbone_type, timm_name):
    """Our small ``backbone_type`` loaded from timm's ``timm_name`` (randomized) gives timm's
    ``forward_features`` patch tokens as a (B, 384, 14, 14) map at 224 x 224."""
    reference, path = timm_checkpoint(timm, timm_name, tmp_path)
    ours = MODELS.build(dict(type=backbone_type, arch='small',
                             init_cfg=dict(type='Pretrained', checkpoint=path)))
    ours.init_weights()
    ours.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        tokens = reference.forward_features(x)  # (B, 1 + 196, 384)
        (out, ) = ours(x)
    assert out.shape == (2, 384, 14, 14)
    expected = tokens[:, 1:].reshape(2, 14, 14, 384).permute(0, 3, 1, 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def assert_two_stride_16_maps_of_64_channels(model, size):
    """``model`` (two outputs, 64 channels, patch 16) maps a ``size`` image to finite
    ``ceil(size / 16)`` maps: any input size works."""
    model.eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    grid = ((size[0] + 15) // 16, (size[1] + 15) // 16)
    assert [o.shape for o in outs] == [(1, 64, *grid)] * 2
    assert all(torch.isfinite(o).all() for o in outs)


def assert_timm_checkpoint_is_refused(timm, tmp_path, backbone_type, timm_name, match):
    """Loading timm's ``timm_name`` into a small ``backbone_type`` fails with a ValueError
    naming what does not fit (``match``)."""
    _, path = timm_checkpoint(timm, timm_name, tmp_path)
    model = backbone_type(arch='small', init_cfg=dict(type='Pretrained', checkpoint=path))
    with pytest.raises(ValueError, match=match):
        model.init_weights()


def assert_every_parameter_has_a_gradient(model):
    """After a backward: every parameter got a finite, non-zero gradient."""
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def assert_with_cp_gives_same_gradients(build, input_shape=(1, 3, 64, 96)):
    """``build()`` and ``build(with_cp=True)`` with the same weights train to equal gradients."""
    torch.manual_seed(0)
    plain, checkpointed = build(), build(with_cp=True)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(*input_shape)
    for model in (plain, checkpointed):
        model.train()
        model(x)[0].square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def shrink_to_smoke_run(cfg, tmp_path):
    """The config as it is, on 8 tiny images for 2 iterations, evaluated at the end."""
    spec = dict(seed=0, num_train=4, num_val=2, image_size=(96, 128), max_objects=3)
    data_root = str(tmp_path / 'shapes') + '/'
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        loader.update(batch_size=2, num_workers=0, persistent_workers=False)
        loader.dataset.update(data_root=data_root, spec=spec)
    cfg.val_evaluator.ann_file = data_root + 'annotations/val.json'
    cfg.test_evaluator = cfg.val_evaluator
    cfg.train_cfg.update(max_epochs=1, val_interval=1)
    cfg.work_dir = str(tmp_path / 'work')
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=1, save_last=False)
    cfg.log_level = 'WARNING'


def assert_config_trains_and_evaluates(config, tmp_path, backbone_type, trained_weight):
    """The repository config ``config`` trains its ``backbone_type`` backbone (the tensor
    ``trained_weight(backbone)`` changes) and evaluates to a COCO bbox mAP, in a smoke run."""
    from mmengine.runner import Runner
    cfg = Config.fromfile(osp.join(REPO_ROOT, config))
    shrink_to_smoke_run(cfg, tmp_path)
    runner = Runner.from_cfg(cfg)
    backbone = runner.model.backbone
    assert isinstance(backbone, backbone_type)
    before = trained_weight(backbone).detach().clone()
    runner.train()
    assert not torch.equal(trained_weight(backbone).detach(), before)
    metrics = runner.val_loop.run()
    assert 'coco/bbox_mAP' in metrics
