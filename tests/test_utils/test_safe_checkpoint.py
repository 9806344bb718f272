"""Checkpoint loading after ``import mmdet_detrx``: safe by default, mmengine's own files load."""
import fractions
import os
import os.path as osp

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner import CheckpointLoader, Runner
from mmengine.runner.checkpoint import load_checkpoint

import mmdet_detrx  # noqa: F401  (registers the safe loaders)
from mmdet_detrx.utils import (TRUSTED_CHECKPOINTS_ENV, UnsafeCheckpointError,
                               mmengine_checkpoint_globals)

from toy_runner import toy_runner_cfg


class _RunsShellCommand:
    """What an attacker pickles: unpickling it calls os.system."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command, )


def _allowed_names():
    names = set()
    for item in mmengine_checkpoint_globals():
        if isinstance(item, tuple):
            names.add(item[1])
        else:
            names.add(f'{item.__module__}.{item.__qualname__}')
    return names


def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(TRUSTED_CHECKPOINTS_ENV, raising=False)
    marker = tmp_path / 'pwned'
    ckpt = str(tmp_path / 'evil.pth')
    torch.save({'state_dict': {}, 'meta': _RunsShellCommand(f'touch {marker}')}, ckpt)
    with pytest.raises(UnsafeCheckpointError, match='system') as info:
        CheckpointLoader.load_checkpoint(ckpt, map_location='cpu')
    assert ckpt in str(info.value) and TRUSTED_CHECKPOINTS_ENV in str(info.value)
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(torch.nn.Linear(2, 2), ckpt)
    assert not marker.exists()


def test_trusted_opt_in_loads_full_pickles(tmp_path, monkeypatch):
    ckpt = str(tmp_path / 'legacy.pth')
    torch.save({'state_dict': {}, 'meta': {'ratio': fractions.Fraction(1, 3)}}, ckpt)
    monkeypatch.delenv(TRUSTED_CHECKPOINTS_ENV, raising=False)
    with pytest.raises(UnsafeCheckpointError, match='Fraction'):
        CheckpointLoader.load_checkpoint(ckpt)
    monkeypatch.setenv(TRUSTED_CHECKPOINTS_ENV, '1')
    assert CheckpointLoader.load_checkpoint(ckpt)['meta']['ratio'] == fractions.Fraction(1, 3)


def test_mmengine_runner_checkpoint_loads_safely_and_resumes(tmp_path, monkeypatch):
    monkeypatch.delenv(TRUSTED_CHECKPOINTS_ENV, raising=False)
    runner = Runner.from_cfg(toy_runner_cfg(tmp_path / 'train', max_iters=2))
    runner.train()
    ckpt = osp.join(runner.work_dir, 'iter_2.pth')
    # what mmengine really writes needs only globals on our allow-list (and some of each kind)
    with open(ckpt, 'rb') as f:
        needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(f))
    assert needed <= _allowed_names(), needed - _allowed_names()
    assert 'mmengine.logging.history_buffer.HistoryBuffer' in needed
    assert any(name.endswith('multiarray.scalar') for name in needed)
    checkpoint = CheckpointLoader.load_checkpoint(ckpt, map_location='cpu')
    assert isinstance(checkpoint['message_hub']['log_scalars']['train/loss'], HistoryBuffer)

    resumed = Runner.from_cfg(
        toy_runner_cfg(tmp_path / 'resumed', max_iters=3, load_from=ckpt, resume=True))
    resumed.train()
    assert resumed.iter == 3
    history = resumed.message_hub.get_scalar('train/loss')
    assert len(history.data[0]) == 3  # the two resumed loss values plus the new one


def test_numpy1_checkpoint_names_load(tmp_path, monkeypatch):
    """Checkpoints written under numpy 1.x (mmdet's model zoo) name ``numpy.core.multiarray``."""
    monkeypatch.delenv(TRUSTED_CHECKPOINTS_ENV, raising=False)
    ckpt = str(tmp_path / 'zoo.pth')
    torch.save({'state_dict': {'w': torch.ones(2)},
                'meta': {'lr': np.float64(0.5), 'hist': np.arange(3), 'dtype': np.dtype('f4')}},
               ckpt, _use_new_zipfile_serialization=False)
    with open(ckpt, 'rb') as f:
        data = f.read()
    if b'numpy._core.multiarray' in data:  # written by numpy 2: rename as numpy 1 did
        with open(ckpt, 'wb') as f:
            f.write(data.replace(b'numpy._core.multiarray', b'numpy.core.multiarray'))
    checkpoint = CheckpointLoader.load_checkpoint(ckpt)
    assert checkpoint['meta']['lr'] == 0.5 and checkpoint['meta']['hist'].tolist() == [0, 1, 2]


def test_nothing_added_to_torch_process_wide_allow_list(tmp_path):
    ckpt = str(tmp_path / 'hub.pth')
    torch.save({'h': HistoryBuffer()}, ckpt)
    assert HistoryBuffer not in torch.serialization.get_safe_globals()
    with pytest.raises(Exception, match='Weights only load failed'):
        torch.load(ckpt)  # plain torch.load keeps torch's own default


def test_missing_checkpoint_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        CheckpointLoader.load_checkpoint(str(tmp_path / 'nope.pth'))


@pytest.fixture
def http_server(tmp_path, monkeypatch):
    """Serve ``tmp_path/served`` over http://127.0.0.1 (model-zoo URLs load through torch.hub)."""
    import functools
    import http.server
    import threading
    served = tmp_path / 'served'
    served.mkdir()
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))  # torch.hub's cache
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()
    server.server_close()


def test_url_checkpoints_load_safely(http_server, tmp_path, monkeypatch):
    monkeypatch.delenv(TRUSTED_CHECKPOINTS_ENV, raising=False)
    served, url = http_server
    torch.save({'state_dict': {'w': torch.ones(1)}, 'meta': {'hist': HistoryBuffer([1.0], [1])}},
               str(served / 'zoo.pth'))
    marker = tmp_path / 'pwned'
    torch.save({'meta': _RunsShellCommand(f'touch {marker}')}, str(served / 'evil.pth'))
    checkpoint = CheckpointLoader.load_checkpoint(f'{url}/zoo.pth', map_location='cpu')
    assert checkpoint['state_dict']['w'].item() == 1.0
    with pytest.raises(UnsafeCheckpointError, match='system'):
        CheckpointLoader.load_checkpoint(f'{url}/evil.pth')
    assert not marker.exists()
