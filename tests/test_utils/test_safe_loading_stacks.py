"""A crafted checkpoint runs no code on either mmdet stack, whichever tool or mmengine path loads it.

OneDL's mmengine (``onedl-mmengine``) loads checkpoints through
``mmengine.runner.checkpoint._safe_torch_load``: ``weights_only=True`` first and, on any
``UnpicklingError``, a logged warning and ``torch.load(..., weights_only=False)``, which runs the
file's code. OpenMMLab's mmengine 0.10.7 has no such function. Importing ``mmdet_detrx`` must
leave that fallback unreachable (docs/tools.md, "Checkpoint safety") unless the user opts in
with ``MMDET_DETRX_TRUSTED_CHECKPOINTS=1`` / ``--trust-checkpoint``.
"""
import io
import json
import os
import os.path as osp
import subprocess
import sys

import mmdet
import pytest
import torch
from _helpers.synthetic_shapes import tiny_run_options
from mmengine.runner import CheckpointLoader
from mmengine.runner import checkpoint as mmengine_checkpoint

import mmdet_detrx  # noqa: F401  (installs the safe loaders)
from mmdet_detrx.stacks import installed_stack
from mmdet_detrx.utils import TRUSTED_CHECKPOINTS_ENV, UnsafeCheckpointError

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DEMO = 'configs/demo/deformable-detrx_r18_1xb8-1000i_synthetic-shapes.py'
MMDET_TOOLS = osp.join(osp.dirname(mmdet.__file__), '.mim', 'tools')
ONEDL = installed_stack()['mmengine'][0][0] == 'onedl'
onedl_only = pytest.mark.skipif(not ONEDL, reason="OneDL mmengine's fallback loader")


class _TouchesFile:
    """What an attacker pickles: unpickling it runs ``touch path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f'touch {self.path}', )


def _crafted(path, marker):
    torch.save({'state_dict': {}, 'meta': _TouchesFile(marker)}, str(path))
    return str(path)


def test_stack_under_test_has_the_expected_loader():
    """The fallback exists exactly on OneDL (if OpenMMLab ever adds one, this test says so)."""
    assert hasattr(mmengine_checkpoint, '_safe_torch_load') == ONEDL


@onedl_only
@pytest.mark.parametrize('as_buffer', [False, True], ids=['path', 'buffer'])
def test_onedl_fallback_loader_refuses_crafted_pickle(tmp_path, monkeypatch, as_buffer):
    """``_safe_torch_load`` as mmengine's pavi://, s3://, petrel:// and open-mmlab:// loaders
    call it (a path, or the BytesIO the s3/petrel loader reads into)."""
    monkeypatch.delenv(TRUSTED_CHECKPOINTS_ENV, raising=False)
    marker = tmp_path / 'pwned'
    evil = _crafted(tmp_path / 'evil.pth', marker)
    if as_buffer:
        with open(evil, 'rb') as f:
            evil = io.BytesIO(f.read())
    with pytest.raises(UnsafeCheckpointError, match='posix.system'):
        mmengine_checkpoint._safe_torch_load(evil, map_location='cpu')
    assert not marker.exists()


@onedl_only
def test_onedl_fallback_loader_reads_mmengine_checkpoints_and_honours_opt_in(tmp_path,
                                                                              monkeypatch):
    from mmengine.logging import HistoryBuffer
    monkeypatch.delenv(TRUSTED_CHECKPOINTS_ENV, raising=False)
    ckpt = str(tmp_path / 'ok.pth')
    torch.save({'state_dict': {'w': torch.ones(1)}, 'message_hub': HistoryBuffer([1.0], [1])},
               ckpt)
    assert mmengine_checkpoint._safe_torch_load(ckpt)['state_dict']['w'].item() == 1.0
    marker = tmp_path / 'ran'
    legacy = _crafted(tmp_path / 'legacy.pth', marker)
    monkeypatch.setenv(TRUSTED_CHECKPOINTS_ENV, '1')
    mmengine_checkpoint._safe_torch_load(legacy)
    assert marker.exists()  # the user opted in: a full pickle, as OneDL's fallback would load


def test_open_mmlab_scheme_with_local_file_runs_nothing(tmp_path, monkeypatch):
    """``open-mmlab://NAME`` whose table entry is a local file (``$MMENGINE_HOME/open_mmlab.json``):
    on OneDL the loader reaching the fallback by name; OpenMMLab's calls torch.load, whose
    default (weights_only=True since torch 2.6) refuses it."""
    monkeypatch.delenv(TRUSTED_CHECKPOINTS_ENV, raising=False)
    monkeypatch.setenv('MMENGINE_HOME', str(tmp_path))
    marker = tmp_path / 'pwned'
    _crafted(tmp_path / 'evil.pth', marker)
    (tmp_path / 'open_mmlab.json').write_text(json.dumps({'detrx_evil': 'evil.pth'}))
    error = UnsafeCheckpointError if ONEDL else Exception
    with pytest.raises(error, match='system'):
        CheckpointLoader.load_checkpoint('open-mmlab://detrx_evil', map_location='cpu')
    assert not marker.exists()


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp('shapes') / 'data')


def _tool(script, args, data_root, trusted=False):
    env = dict(os.environ, OMP_NUM_THREADS='1', MMDET_DETRX_DATA_ROOT=data_root,
               PYTHONPATH=ROOT)
    env.pop(TRUSTED_CHECKPOINTS_ENV, None)
    if trusted:
        env[TRUSTED_CHECKPOINTS_ENV] = '1'
    return subprocess.run([sys.executable, script, DEMO, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def _assert_refused(proc, marker):
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert 'refused to load checkpoint' in proc.stderr, proc.stderr[-4000:]
    assert 'posix.system' in proc.stderr and TRUSTED_CHECKPOINTS_ENV in proc.stderr
    assert 'Falling back to weights_only=False' not in proc.stdout + proc.stderr
    assert not marker.exists()


# (tool, how the checkpoint reaches it): mmdet's own tools (the config's custom_imports imports
# mmdet_detrx) through `checkpoint` (test), `--resume PATH` and `load_from`, and our train.py
# (our test.py: tests/test_tools/test_train_test_tools.py). Each is a process start that builds
# the runner, so only the paths that differ are here.
CASES = {
    'mmdet-test': (osp.join(MMDET_TOOLS, 'test.py'), lambda evil: [evil]),
    'mmdet-train-resume': (osp.join(MMDET_TOOLS, 'train.py'), lambda evil: ['--resume', evil]),
    'mmdet-train-load_from': (osp.join(MMDET_TOOLS, 'train.py'), lambda evil: [
        '--cfg-options', f'load_from={evil}']),
    'ours-train-resume': ('tools/train.py', lambda evil: ['--resume', evil]),
}


@pytest.mark.parametrize('case', list(CASES))
def test_tools_refuse_crafted_pickle(case, data_root, tmp_path):
    script, checkpoint_args = CASES[case]
    marker = tmp_path / 'pwned'
    evil = _crafted(tmp_path / 'evil.pth', marker)
    args = checkpoint_args(evil)
    if args[0] == '--cfg-options':  # one --cfg-options list: append to the tiny run's options
        options = tiny_run_options(1) + args[1:]
    else:
        options = args + tiny_run_options(1)
    proc = _tool(script, [*options, '--work-dir', str(tmp_path / 'work')], data_root)
    _assert_refused(proc, marker)


def test_opt_in_reaches_the_full_pickle_in_mmdet_test_tool(data_root, tmp_path):
    """With MMDET_DETRX_TRUSTED_CHECKPOINTS=1 mmdet's own test.py loads the whole pickle."""
    marker = tmp_path / 'ran'
    evil = _crafted(tmp_path / 'legacy.pth', marker)
    _tool(osp.join(MMDET_TOOLS, 'test.py'), [evil, '--work-dir', str(tmp_path / 'work'),
                                             *tiny_run_options(1)], data_root, trusted=True)
    assert marker.exists()


def test_our_test_tool_trust_checkpoint_flag_opts_in(data_root, tmp_path):
    marker = tmp_path / 'ran'
    evil = _crafted(tmp_path / 'legacy.pth', marker)
    _tool('tools/test.py', [evil, '--trust-checkpoint', '--work-dir', str(tmp_path / 'work'),
                            *tiny_run_options(1)], data_root)
    assert marker.exists()
