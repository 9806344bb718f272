"""Every config under configs/ parses and builds its model, with no data present."""
import glob
import os.path as osp

import pytest
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.config import Config

import mmdet_detrx  # noqa: F401

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = sorted(
    osp.relpath(p, ROOT) for p in glob.glob(osp.join(ROOT, 'configs', '**', '*.py'),
                                            recursive=True)
    if '_base_' not in p)


@pytest.fixture(scope='module', autouse=True)
def _mmdet_scope():
    register_all_modules(init_default_scope=True)


def test_configs_exist():
    assert len(CONFIGS) >= 1


@pytest.mark.parametrize('config', CONFIGS)
def test_config_builds(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data_root-independent: nothing relative may be needed
    cfg = Config.fromfile(osp.join(ROOT, config))
    assert 'mmdet_detrx' in cfg.get('custom_imports', {}).get('imports', []), (
        f'{config} must import mmdet_detrx')
    model = MODELS.build(cfg.model)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_unknown_type_names_it():
    cfg = Config(dict(model=dict(type='NoSuchDetectorX')))
    with pytest.raises(KeyError, match='NoSuchDetectorX'):
        MODELS.build(cfg.model)


@pytest.mark.parametrize('config', CONFIGS)
def test_auto_scale_lr_is_usable_by_mmdet_train(config):
    """mmdet's tools/train.py --auto-scale-lr needs both keys, and sets enable=True itself."""
    cfg = Config.fromfile(osp.join(ROOT, config))
    auto_scale_lr = cfg.get('auto_scale_lr')
    assert auto_scale_lr is not None, f'{config}: no auto_scale_lr'
    assert 'enable' in auto_scale_lr and 'base_batch_size' in auto_scale_lr, (
        f'{config}: auto_scale_lr={auto_scale_lr} lacks enable / base_batch_size')
    assert auto_scale_lr.base_batch_size > 0
