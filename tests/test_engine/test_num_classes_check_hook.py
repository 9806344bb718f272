"""NumClassesCheckHook: dataset classes and head num_classes disagree -> stop before the run,
naming both numbers and the keys; with our tools, with the hook directly, with mmdet's tools."""
import glob
import os
import os.path as osp
import subprocess
import sys
import types

import mmdet
import pytest
import torch
from _helpers import REPO_CONFIGS, REPO_ROOT
from _helpers.synthetic_shapes import tiny_run_options
from mmdet.registry import HOOKS
from mmengine.config import Config
from mmengine.runner import BaseLoop

import mmdet_detrx  # noqa: F401
from mmdet_detrx.engine.hooks import NumClassesMismatchError, check_num_classes_cfg

DEMO = osp.join(REPO_CONFIGS, 'demo', 'deformable-detrx_r18_1xb8-1000i_synthetic-shapes.py')


def test_config_check_names_numbers_and_keys():
    cfg = Config.fromfile(DEMO)
    check_num_classes_cfg(cfg, ('train_dataloader', 'val_dataloader', 'test_dataloader'))
    cfg.model.bbox_head.num_classes = 2
    with pytest.raises(NumClassesMismatchError) as info:
        check_num_classes_cfg(cfg, ('train_dataloader', ))
    message = str(info.value)
    assert ("train_dataloader: the dataset (SyntheticShapesDataset) has 3 classes ('circle', "
            "'square', 'triangle') but model.bbox_head.num_classes is 2") in message
    assert 'model.bbox_head.num_classes=3' in message
    assert 'train_dataloader.dataset.metainfo=dict(classes=(...))' in message
    cfg.train_dataloader.dataset.metainfo = dict(classes=('circle', 'square'))
    check_num_classes_cfg(cfg, ('train_dataloader', ))  # the dataset's classes changed instead


class _Loop(BaseLoop):

    def __init__(self, classes):
        self.dataloader = types.SimpleNamespace(
            dataset=types.SimpleNamespace(metainfo=dict(classes=classes)))

    def run(self):
        pass


def test_hook_checks_the_loops_of_the_run():
    model = torch.nn.Module()
    model.bbox_head = torch.nn.Module()
    model.bbox_head.num_classes = 2
    model.rpn_head = types.SimpleNamespace()  # class-agnostic heads are not compared
    hook = HOOKS.build(dict(type='NumClassesCheckHook'))
    hook.before_run(types.SimpleNamespace(model=model, _train_loop=_Loop(('a', 'b')),
                                          _val_loop=None, _test_loop=dict(type='TestLoop')))
    with pytest.raises(NumClassesMismatchError, match='test_dataloader: .* has 3 classes'):
        hook.before_run(types.SimpleNamespace(model=model, _train_loop=None, _val_loop=None,
                                              _test_loop=_Loop(('a', 'b', 'c'))))


def test_mmdet_train_tool_stops_before_the_first_iteration(tmp_path):
    """mmdet's own tools/train.py on the demo config with a 2-class head: the schedule base's
    default_hooks.num_classes_check stops it (it crashed in match_cost.py with IndexError)."""
    work_dir = str(tmp_path / 'work')
    tool = osp.join(osp.dirname(mmdet.__file__), '.mim', 'tools', 'train.py')
    env = dict(os.environ, OMP_NUM_THREADS='1', MMDET_DETRX_DATA_ROOT=str(tmp_path / 'shapes'))
    proc = subprocess.run(
        [sys.executable, tool, DEMO, '--work-dir', work_dir,
         *tiny_run_options(2, extra=['model.bbox_head.num_classes=2'])],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0
    assert 'NumClassesMismatchError' in proc.stderr
    assert 'has 3 classes' in proc.stderr and 'model.bbox_head.num_classes is 2' in proc.stderr
    assert 'IndexError' not in proc.stderr
    assert not glob.glob(osp.join(work_dir, '*.pth'))
