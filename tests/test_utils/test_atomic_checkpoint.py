"""Atomic checkpoint writes and an auto-resume that skips broken or moved checkpoints."""
import os
import os.path as osp
import shutil
from unittest import mock

import pytest
import torch
from mmengine.config import Config
from mmengine.fileio import get_file_backend
from mmengine.runner import Runner

from mmdet_detrx.utils import (AtomicLocalBackend, atomic_write, checkpoint_problem,
                               find_resumable_checkpoint, use_atomic_checkpoints)
from toy_runner import toy_runner_cfg


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_write_replaces_whole_file_with_usual_mode(tmp_path, umask_022):
    target = str(tmp_path / 'iter_1.pth')
    atomic_write(target, b'old')
    atomic_write(target, b'new contents')
    assert open(target, 'rb').read() == b'new contents'
    assert os.stat(target).st_mode & 0o777 == 0o644
    assert os.listdir(tmp_path) == ['iter_1.pth']  # no temporary file left


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    target = str(tmp_path / 'iter_1.pth')
    atomic_write(target, b'intact')

    def disk_full(fd):
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(os, 'fsync', disk_full)
    with pytest.raises(OSError, match='No space'):
        atomic_write(target, b'half')
    assert open(target, 'rb').read() == b'intact'
    assert os.listdir(tmp_path) == ['iter_1.pth']


def test_runner_writes_through_atomic_backend(tmp_path, monkeypatch):
    cfg = Config(toy_runner_cfg(tmp_path / 'work', max_iters=2))
    use_atomic_checkpoints(cfg)
    assert cfg.default_hooks.checkpoint.backend_args == dict(backend='atomic_local')
    assert isinstance(get_file_backend('x', backend_args=dict(backend='atomic_local')),
                      AtomicLocalBackend)
    written = []
    real_put = AtomicLocalBackend.put

    def counting_put(self, obj, filepath):
        written.append(osp.basename(filepath))
        real_put(self, obj, filepath)

    monkeypatch.setattr(AtomicLocalBackend, 'put', counting_put)
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert written == ['iter_1.pth', 'iter_2.pth']
    assert checkpoint_problem(osp.join(runner.work_dir, 'iter_2.pth')) is None


def test_config_naming_its_own_backend_is_left_alone():
    cfg = Config(dict(default_hooks=dict(checkpoint=dict(
        type='CheckpointHook', backend_args=dict(backend='petrel')))))
    use_atomic_checkpoints(cfg)
    assert cfg.default_hooks.checkpoint.backend_args == dict(backend='petrel')


@pytest.fixture(scope='module')
def work_dir(tmp_path_factory):
    """A work dir written by a real 3-iteration run: iter_1..3.pth and last_checkpoint."""
    tmp = tmp_path_factory.mktemp('resume')
    runner = Runner.from_cfg(toy_runner_cfg(tmp / 'work', max_iters=3))
    runner.train()
    return runner.work_dir


def _copy(work_dir, dst):
    shutil.copytree(work_dir, dst)
    return str(dst)


def test_intact_latest_is_chosen(work_dir):
    assert find_resumable_checkpoint(work_dir) == osp.join(work_dir, 'iter_3.pth')


def test_truncated_latest_is_skipped_with_warning(work_dir, tmp_path):
    copy = _copy(work_dir, tmp_path / 'copy')
    latest = osp.join(copy, 'iter_3.pth')
    size = osp.getsize(latest)
    with open(latest, 'r+b') as f:
        f.truncate(size // 2)  # what a kill or a full disk during the save leaves
    with open(osp.join(copy, 'last_checkpoint'), 'w') as f:
        f.write(latest)
    assert 'truncated' in checkpoint_problem(latest)
    with mock.patch('mmdet_detrx.utils.atomic_checkpoint.print_log') as log:
        assert find_resumable_checkpoint(copy) == osp.join(copy, 'iter_2.pth')
    warning = log.call_args.args[0]
    assert latest in warning and 'truncated' in warning


def test_corrupted_bytes_are_detected(work_dir, tmp_path):
    copy = _copy(work_dir, tmp_path / 'copy')
    latest = osp.join(copy, 'iter_3.pth')
    data = bytearray(open(latest, 'rb').read())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)  # zeroed sector inside a tensor record
    open(latest, 'wb').write(bytes(data))
    with open(osp.join(copy, 'last_checkpoint'), 'w') as f:
        f.write(latest)
    assert 'corrupt record' in checkpoint_problem(latest)
    assert find_resumable_checkpoint(copy) == osp.join(copy, 'iter_2.pth')


def test_moved_work_dir_resolves_last_checkpoint_locally(work_dir, tmp_path):
    copy = _copy(work_dir, tmp_path / 'copy')
    with open(osp.join(copy, 'last_checkpoint'), 'w') as f:
        f.write('/gone/original/work_dir/iter_2.pth')  # the original dir was deleted
    assert find_resumable_checkpoint(copy) == osp.join(copy, 'iter_2.pth')


def test_nothing_resumable(tmp_path):
    (tmp_path / 'iter_1.pth').write_bytes(b'')
    assert find_resumable_checkpoint(str(tmp_path)) is None
    # loadable, but not what Runner.resume reads (meta.epoch/iter, message_hub)
    torch.save({'state_dict': {}}, str(tmp_path / 'iter_2.pth'))
    assert 'not a training checkpoint' in checkpoint_problem(str(tmp_path / 'iter_2.pth'))
    assert find_resumable_checkpoint(str(tmp_path)) is None
    torch.save({'state_dict': {}, 'meta': {'epoch': 0, 'iter': 3}, 'message_hub': {}},
               str(tmp_path / 'iter_3.pth'))
    assert find_resumable_checkpoint(str(tmp_path)) == str(tmp_path / 'iter_3.pth')


@pytest.mark.parametrize('target', ['text', 'tensor', 'weights_only'])
def test_non_checkpoint_last_checkpoint_target_is_skipped(work_dir, tmp_path, target):
    copy = _copy(work_dir, tmp_path / 'copy')
    wrong = osp.join(copy, 'iter_9.pth')
    if target == 'text':
        open(wrong, 'w').write('not a checkpoint\n')
    elif target == 'tensor':
        torch.save(torch.ones(2), wrong)
    else:  # a model's weights only: loads, but resume would fail on the missing meta
        torch.save({'state_dict': {'w': torch.ones(1)}}, wrong)
    with open(osp.join(copy, 'last_checkpoint'), 'w') as f:
        f.write(wrong)
    assert checkpoint_problem(wrong) is not None
    assert find_resumable_checkpoint(copy) == osp.join(copy, 'iter_3.pth')


def test_truncated_legacy_format_checkpoint_is_skipped(work_dir, tmp_path):
    copy = _copy(work_dir, tmp_path / 'copy')
    latest = osp.join(copy, 'iter_4.pth')
    checkpoint = torch.load(osp.join(copy, 'iter_3.pth'), weights_only=False)
    checkpoint['meta']['iter'] = 4
    torch.save(checkpoint, latest, _use_new_zipfile_serialization=False)
    with open(osp.join(copy, 'last_checkpoint'), 'w') as f:
        f.write(latest)
    assert checkpoint_problem(latest) is None  # the legacy format itself is fine
    assert find_resumable_checkpoint(copy) == latest
    for size in (osp.getsize(latest) // 2, 40):  # inside the tensor data, inside the pickle
        with open(latest, 'r+b') as f:
            f.truncate(size)
        assert checkpoint_problem(latest) is not None
        assert find_resumable_checkpoint(copy) == osp.join(copy, 'iter_3.pth')
