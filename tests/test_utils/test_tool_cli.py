"""mmdet_detrx.utils.tool_cli: what tools/train.py and tools/test.py share."""
import argparse
import os
import os.path as osp

import pytest

from mmdet_detrx.utils import TRUSTED_CHECKPOINTS_ENV
from mmdet_detrx.utils.tool_cli import add_runner_args, load_tool_config, require_checkpoint_match

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DEMO = osp.join(ROOT, 'configs/demo/deformable-detrx_r18_1xb8-1000i_synthetic-shapes.py')


def _parse(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument('config')
    parser.add_argument('--work-dir')
    add_runner_args(parser, partial_load_help='evaluate a checkpoint')
    return parser, parser.parse_args(argv)


def test_config_gets_launcher_options_and_mmdet_default_work_dir(monkeypatch):
    monkeypatch.setenv(TRUSTED_CHECKPOINTS_ENV, '0')  # restored after the test, set or not
    monkeypatch.delenv(TRUSTED_CHECKPOINTS_ENV)
    parser, args = _parse([DEMO, '--launcher', 'pytorch', '--cfg-options', 'data_root=/d/'])
    assert 'evaluate a checkpoint whose keys' in parser.format_help()
    cfg = load_tool_config(args)
    assert cfg.launcher == 'pytorch'
    assert cfg.work_dir == './work_dirs/deformable-detrx_r18_1xb8-1000i_synthetic-shapes'
    assert cfg.val_dataloader.dataset.data_root == '/d/'  # merge_cfg_options moved the data
    assert TRUSTED_CHECKPOINTS_ENV not in os.environ
    _, args = _parse([DEMO, '--work-dir', 'elsewhere', '--trust-checkpoint'])
    assert load_tool_config(args).work_dir == 'elsewhere'
    assert os.environ[TRUSTED_CHECKPOINTS_ENV] == '1'


def test_typo_in_cfg_options_fails():
    _, args = _parse([DEMO, '--cfg-options', 'trian_cfg.max_iters=2'])
    with pytest.raises(KeyError, match='train_cfg'):
        load_tool_config(args)


def test_checkpoint_match_hook_unless_partial_load_allowed():
    _, args = _parse([DEMO])
    cfg = load_tool_config(args)
    hooks = list(cfg.get('custom_hooks') or [])
    require_checkpoint_match(cfg, allow_partial_load=True)
    assert list(cfg.get('custom_hooks') or []) == hooks
    require_checkpoint_match(cfg, allow_partial_load=False)
    assert cfg.custom_hooks[-1] == dict(type='CheckpointMatchHook')
