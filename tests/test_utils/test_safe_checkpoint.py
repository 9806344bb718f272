"""Checkpoint loading after ``import mmdet_detrx``: safe by default, mmengine's own files load.

Crafted files are written as raw protocol-2 pickles (:mod:`checkpoint_pickles`) in torch's
legacy container, which ``torch.load`` reads with our restricted unpickler like the zip format.
"""
import argparse
import fractions
import os
import os.path as osp
import time

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner import CheckpointLoader, Runner
from mmengine.runner.checkpoint import load_checkpoint

import mmdet_detrx  # noqa: F401  (registers the safe loaders)
from mmdet_detrx.utils import (TRUSTED_CHECKPOINTS_ENV, UnsafeCheckpointError,
                               mmengine_checkpoint_globals)
from mmdet_detrx.utils.safe_checkpoint import (MAX_NESTING_DEPTH, CorruptCheckpointError,
                                               inert_checkpoint_config, restricted_load)

from checkpoint_pickles import (GLOBAL, HISTORY_BUFFER, PROTO, REDUCE, STOP, TUPLE1,
                                history_buffer_pickle, integer, legacy_checkpoint, string)
from toy_runner import toy_runner_cfg


class _RunsShellCommand:
    """What an attacker pickles: unpickling it calls os.system."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command, )


def _allowed_names():
    return set(mmengine_checkpoint_globals())


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


# --- issue 27: allow-listed types cannot run code, change state or exhaust the machine --------

@pytest.fixture
def untrusted(monkeypatch):
    monkeypatch.delenv(TRUSTED_CHECKPOINTS_ENV, raising=False)


def _refused(tmp_path, pickle_bytes, match, name='evil.pth'):
    path = legacy_checkpoint(tmp_path / name, pickle_bytes)
    start = time.perf_counter()
    with pytest.raises(UnsafeCheckpointError, match=match) as info:
        CheckpointLoader.load_checkpoint(path, map_location='cpu')
    assert path in str(info.value) and time.perf_counter() - start < 5
    return str(info.value)


def test_history_buffer_state_cannot_change_class_statistics(tmp_path, untrusted):
    before = dict(HistoryBuffer._statistics_methods)
    # statistics_methods mapping 'mean' to min: the class table must not change, even though
    # the file is refused only after the buffer (its __setstate__ used to run first)
    swapped = history_buffer_pickle(statistics={'mean': 'min', 'min': 'min'})
    _refused(tmp_path, swapped, 'statistics_methods')
    assert HistoryBuffer._statistics_methods == before
    assert HistoryBuffer([1.0, 3.0], [1, 1]).statistics('mean') == 2.0


def test_history_buffer_extra_fields_cannot_shadow_methods(tmp_path, untrusted):
    message = _refused(tmp_path, history_buffer_pickle(extra={'mean': integer(7)}), 'fields')
    assert "'mean'" in message


def test_history_buffer_loads_as_the_real_class_from_known_fields(tmp_path, untrusted):
    path = legacy_checkpoint(tmp_path / 'ok.pth', history_buffer_pickle())
    buffer = CheckpointLoader.load_checkpoint(path)
    assert type(buffer) is HistoryBuffer and buffer.mean() == 2.0
    assert set(vars(buffer)) == {'max_length', '_log_history', '_count_history'}


def test_array_constructors_are_bounded(tmp_path, untrusted):
    dtype = GLOBAL('numpy', 'dtype') + string('f8') + b'\x89\x88\x87' + REDUCE
    # ndarray(shape, dtype, buffer, offset, strides): a zero-stride view of any size
    zero_stride = (PROTO + GLOBAL('numpy', 'ndarray') + b'(' + integer(2**30) + TUPLE1 +
                   dtype + b't\x81' + STOP)
    _refused(tmp_path, zero_stride, 'numpy.ndarray')
    # _reconstruct + BUILD whose shape needs more data than the file gives
    big = (PROTO + GLOBAL('numpy._core.multiarray', '_reconstruct') + GLOBAL('numpy', 'ndarray') +
           integer(0) + TUPLE1 + b'C\x01b\x87' + REDUCE + b'(' + integer(1) + integer(2**20) +
           integer(2**20) + b'\x86' + dtype + b'\x89C\x08' + bytes(8) + b'tb' + STOP)
    _refused(tmp_path, big, 'needs 8796093022208 bytes of data, the file gives 8')
    # bytearray(n) and torch.Tensor(n) are on torch's own weights-only list
    size = b'\x8a\x06' + (2**40).to_bytes(6, 'little')
    _refused(tmp_path, PROTO + GLOBAL('builtins', 'bytearray') + size + TUPLE1 + REDUCE + STOP,
             'bytearray')
    _refused(tmp_path, PROTO + GLOBAL('torch', 'Tensor') + size + TUPLE1 + REDUCE + STOP,
             'calling torch.Tensor')


def test_tensor_views_and_storages_are_bounded(tmp_path, untrusted):
    path = str(tmp_path / 'expanded.pth')
    torch.save({'exp_avg': torch.ones(1).expand(2**21)}, path)  # 4 bytes on disk, 8 MB as data
    with pytest.raises(UnsafeCheckpointError, match='zero strides'):
        CheckpointLoader.load_checkpoint(path)
    torch.save({'small': torch.ones(1).expand(8)}, path)  # small broadcasts stay fine
    assert CheckpointLoader.load_checkpoint(path)['small'].tolist() == [1.0] * 8
    # a storage declared larger than the file: refused before torch allocates it
    storage = (PROTO + GLOBAL('torch._utils', '_rebuild_tensor_v2') + b'(' +
               b'(' + string('storage') + GLOBAL('torch', 'FloatStorage') + string('0') +
               string('cpu') + integer(2**30) + b'\x4etQ' + integer(0) + integer(2**30) + TUPLE1
               + integer(1) + TUPLE1 + b'\x89' + GLOBAL('collections', 'OrderedDict') + b')R' +
               b'tR' + STOP)
    _refused(tmp_path, storage, 'declare more bytes')


def test_nesting_sharing_and_cycles_are_bounded(tmp_path, untrusted):
    # [x, x] sixty times over: 2**60 nodes for any code that walks it as a tree
    exponential = PROTO + b']q\x00' + integer(1) + b'a'
    for level in range(60):
        exponential += b'(h' + bytes([level]) + b'h' + bytes([level]) + b'lq' + bytes([level + 1])
    _refused(tmp_path, exponential + STOP, 'exponential sharing')
    deep = PROTO + b']' * (MAX_NESTING_DEPTH + 5) + b'a' * (MAX_NESTING_DEPTH + 4) + STOP
    _refused(tmp_path, deep, f'nesting deeper than {MAX_NESTING_DEPTH}')
    _refused(tmp_path, PROTO + b']q\x00h\x00a' + STOP, 'reference cycle')


def test_other_code_paths_are_refused(tmp_path, untrusted):
    getattr_other = (PROTO + GLOBAL('builtins', 'getattr') + HISTORY_BUFFER + string('__init__') +
                     b'\x86' + REDUCE + STOP)
    _refused(tmp_path, getattr_other, 'getattr')
    _refused(tmp_path, PROTO + b'}}b' + STOP, 'BUILD')  # setting state of a dict
    _refused(tmp_path, b'(ios\nsystem\n' + string('true') + STOP, 'INST')


def test_malformed_pickle_is_a_clear_error(tmp_path, untrusted):
    path = legacy_checkpoint(tmp_path / 'bad.pth', PROTO + b']' + b'a' + STOP)  # APPEND, no item
    with pytest.raises(CorruptCheckpointError, match='bad.pth'):
        restricted_load(path)


def test_original_detr_args_namespace_loads(tmp_path, untrusted):
    ckpt = str(tmp_path / 'detr.pth')
    torch.save({'model': {'w': torch.ones(1)}, 'args': argparse.Namespace(lr=1e-4, name='x')},
               ckpt)
    args = CheckpointLoader.load_checkpoint(ckpt)['args']
    assert isinstance(args, argparse.Namespace) and vars(args) == {'lr': 1e-4, 'name': 'x'}


# --- issue 27: config text inside a checkpoint is never executed on resume --------------------

def test_inert_checkpoint_config_keeps_only_literal_gpu_ids():
    checkpoint = {'meta': {'config': 'import os\ngpu_ids = [0, 1]\nx = os.getpid()'}}
    inert_checkpoint_config(checkpoint)
    assert checkpoint['meta']['config'] == 'gpu_ids = [0, 1]\n'
    checkpoint = {'meta': {'config': 'gpu_ids = list(range(__import__("os").getpid()))'}}
    inert_checkpoint_config(checkpoint)
    assert 'config' not in checkpoint['meta']


def test_resume_never_executes_the_checkpoint_config(tmp_path, untrusted):
    runner = Runner.from_cfg(toy_runner_cfg(tmp_path / 'train', max_iters=2))
    runner.train()
    ckpt = osp.join(runner.work_dir, 'iter_2.pth')
    checkpoint = torch.load(ckpt, weights_only=False)
    marker = tmp_path / 'pwned'
    # plain strings and dicts only: passes any weights-only check
    # what mmengine's resume would run with Config.fromstring (it does, without the package)
    checkpoint['meta']['config'] = f'gpu_ids = [0]\nx = __import__("os").system("touch {marker}")\n'
    torch.save(checkpoint, ckpt)
    resumed = Runner.from_cfg(
        toy_runner_cfg(tmp_path / 'resumed', max_iters=3, load_from=ckpt, resume=True))
    resumed.train()
    assert resumed.iter == 3 and not marker.exists()
