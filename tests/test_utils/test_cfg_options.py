"""--cfg-options in our tools: typos fail with close names, data_root moves the whole dataset."""
import os.path as osp

import pytest
from mmengine.config import Config

from mmdet_detrx.utils import merge_cfg_options

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DEMO = osp.join(ROOT, 'configs/demo/deformable-detrx_r18_1xb8-1000i_synthetic-shapes.py')


@pytest.fixture
def demo_cfg(monkeypatch):
    monkeypatch.delenv('MMDET_DETRX_DATA_ROOT', raising=False)
    return Config.fromfile(DEMO)


def test_typo_in_top_level_key_fails_with_close_name(demo_cfg):
    with pytest.raises(KeyError, match="'trian_cfg'.*did you mean train_cfg"):
        merge_cfg_options(demo_cfg, {'trian_cfg.max_iters': 2})
    assert 'trian_cfg' not in demo_cfg


def test_known_and_runner_keys_are_accepted(demo_cfg):
    merge_cfg_options(demo_cfg, {'train_cfg.max_iters': 2, 'resume': True,
                                 'find_unused_parameters': True, 'load_from': 'x.pth'})
    assert demo_cfg.train_cfg.max_iters == 2 and demo_cfg.resume


def test_data_root_moves_dataloaders_and_evaluators(demo_cfg, tmp_path):
    new = str(tmp_path / 'shapes')
    merge_cfg_options(demo_cfg, {'data_root': new})
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        assert demo_cfg[loader].dataset.data_root == new + '/'
    for evaluator in ('val_evaluator', 'test_evaluator'):
        assert demo_cfg[evaluator].ann_file == new + '/annotations/val.json'
    assert demo_cfg.data_root == new


def test_explicit_per_loader_option_still_wins(demo_cfg):
    merge_cfg_options(demo_cfg, {'data_root': '/a/', 'val_evaluator.ann_file': '/b/val.json'})
    assert demo_cfg.val_evaluator.ann_file == '/b/val.json'
    assert demo_cfg.test_evaluator.ann_file == '/a/annotations/val.json'


def test_data_root_under_the_old_one_is_not_applied_twice(demo_cfg):
    merge_cfg_options(demo_cfg, {'data_root': 'data/synthetic_shapes/moved'})
    assert demo_cfg.val_evaluator.ann_file == 'data/synthetic_shapes/moved/annotations/val.json'


def test_environment_key_moves_dataset_for_any_tool(monkeypatch, tmp_path):
    """MMDET_DETRX_DATA_ROOT is substituted by mmengine itself when the config is read."""
    monkeypatch.setenv('MMDET_DETRX_DATA_ROOT', str(tmp_path))
    cfg = Config.fromfile(DEMO)
    assert cfg.train_dataloader.dataset.data_root == f'{tmp_path}/'
    assert cfg.test_evaluator.ann_file == f'{tmp_path}/annotations/val.json'


def test_data_root_moves_only_paths_under_the_old_root():
    """Issue 27.5: 'data/coco_panoptic/...' shares the prefix of the root 'data/coco'."""
    cfg = Config(dict(
        data_root='data/coco',
        train_dataloader=dict(dataset=dict(data_root='data/coco',
                                           ann_file='data/coco/annotations/train.json',
                                           seg_prefix='data/coco_panoptic/train/')),
        val_evaluator=dict(ann_file='data/coco_panoptic/annotations/val.json')))
    merge_cfg_options(cfg, {'data_root': '/new/coco'})
    assert cfg.train_dataloader.dataset.data_root == '/new/coco'
    assert cfg.train_dataloader.dataset.ann_file == '/new/coco/annotations/train.json'
    assert cfg.train_dataloader.dataset.seg_prefix == 'data/coco_panoptic/train/'
    assert cfg.val_evaluator.ann_file == 'data/coco_panoptic/annotations/val.json'


@pytest.mark.parametrize('name', ["it's here", 'two words', 'q"uote', "x' + __import__('os').getcwd() + '"])
def test_environment_data_root_is_data_never_code(monkeypatch, tmp_path, name):
    """Issue 27.5: the variable used to be pasted into the config source (a quote was a
    SyntaxError naming nothing, and a crafted value ran code when the config was read)."""
    root = str(tmp_path / name)
    monkeypatch.setenv('MMDET_DETRX_DATA_ROOT', root)
    cfg = Config.fromfile(DEMO)
    assert cfg.train_dataloader.dataset.data_root == root + '/'
    assert cfg.val_evaluator.ann_file == root + '/annotations/val.json'
