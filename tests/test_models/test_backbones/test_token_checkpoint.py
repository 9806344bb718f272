"""Token-backbone checkpoints (ViT, TNT) go through the package's safe loader.

A checkpoint written by mmengine's Runner (``message_hub`` with ``HistoryBuffer``s and numpy
arrays, ``meta``) loads into the backbone with ``init_cfg=dict(type='Pretrained')``; a pickle
that needs anything else is refused naming it, and loads once the user trusts checkpoints
(``MMDET_DETRX_TRUSTED_CHECKPOINTS=1``, which ``--trust-checkpoint`` sets).
"""
import fractions
import pickle

import pytest
import torch
from _helpers.backbones import randomize_
from mmengine.logging import MessageHub

import mmdet_detrx  # noqa: F401
from mmdet_detrx.models.backbones.tnt import TNT
from mmdet_detrx.models.backbones.vit import ViT
from mmdet_detrx.utils import TRUSTED_CHECKPOINTS_ENV, UnsafeCheckpointError

BACKBONES = {
    'ViT': (ViT, dict(embed_dims=64, num_layers=3, num_heads=2, feedforward_channels=128)),
    'TNT': (TNT, dict(embed_dims=64, inner_dims=8, num_layers=2, num_heads=2, inner_num_heads=2,
                      mlp_ratio=2.)),
}


@pytest.fixture
def untrusted(monkeypatch):
    monkeypatch.delenv(TRUSTED_CHECKPOINTS_ENV, raising=False)


def runner_checkpoint(state_dict, path, **extra):
    """What ``Runner.save_checkpoint`` writes for a detector: meta, the detector's state dict
    (``backbone.`` prefix), the message hub's state (HistoryBuffer, numpy arrays)."""
    hub = MessageHub.get_instance('test_token_checkpoint')
    hub.update_scalar('train/loss', 1.5)
    hub.update_scalar('train/lr', 1e-4)
    torch.save(dict(meta=dict(epoch=1, iter=8, seed=0, **extra),
                    state_dict={f'backbone.{k}': v for k, v in state_dict.items()},
                    message_hub=hub.state_dict()), path)
    return path


def assert_loaded(backbone, source):
    for key, value in source.state_dict().items():
        assert torch.equal(backbone.state_dict()[key], value), key


@pytest.mark.parametrize('name', sorted(BACKBONES))
def test_runner_checkpoint_loads(name, tmp_path, untrusted):
    cls, arch = BACKBONES[name]
    source = randomize_(cls(arch=arch))
    path = runner_checkpoint(source.state_dict(), str(tmp_path / 'iter_8.pth'))
    with pytest.raises(pickle.UnpicklingError):  # what torch's weights-only loader (the old reader) did
        torch.load(path, weights_only=True)
    backbone = cls(arch=arch, init_cfg=dict(type='Pretrained', checkpoint=path))
    backbone.init_weights()
    assert_loaded(backbone, source)


@pytest.mark.parametrize('name', sorted(BACKBONES))
def test_untrusted_pickle_refused_then_trusted(name, tmp_path, monkeypatch, untrusted):
    cls, arch = BACKBONES[name]
    source = randomize_(cls(arch=arch))
    path = runner_checkpoint(source.state_dict(), str(tmp_path / 'legacy.pth'),
                             ratio=fractions.Fraction(1, 3))
    backbone = cls(arch=arch, init_cfg=dict(type='Pretrained', checkpoint=path))
    with pytest.raises(UnsafeCheckpointError,
                       match=r'legacy\.pth: it needs the global fractions\.Fraction'):
        backbone.init_weights()
    monkeypatch.setenv(TRUSTED_CHECKPOINTS_ENV, '1')  # what --trust-checkpoint sets
    backbone.init_weights()
    assert_loaded(backbone, source)
