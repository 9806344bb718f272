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


MTKD_SYNTHETIC = sorted(c for c in CONFIGS if c.startswith('configs/mtkd/')
                        and c.endswith('_synthetic-shapes.py'))


@pytest.mark.parametrize('config', MTKD_SYNTHETIC)
def test_mtkd_scores_both_branches_where_the_dataset_is(config, monkeypatch, tmp_path):
    """act/ and full/ metrics read the dataset's annotations, and move with it."""
    monkeypatch.setenv('MMDET_DETRX_DATA_ROOT', str(tmp_path / 'moved'))
    cfg = Config.fromfile(osp.join(ROOT, config))
    assert cfg.model.test_branch == 'both'
    for evaluator in (cfg.val_evaluator, cfg.test_evaluator):
        assert [(e.type, e.prefix) for e in evaluator] == [('CocoMetric', 'act'),
                                                           ('BranchCocoMetric', 'full')]
        assert evaluator[1].pred_key == 'full_pred_instances'
        for metric in evaluator:
            assert metric.ann_file == str(tmp_path / 'moved' / 'annotations' / 'val.json')
            assert metric.ann_file == osp.join(cfg.val_dataloader.dataset.data_root,
                                               cfg.val_dataloader.dataset.ann_file)


def test_mtkd_starts_from_what_the_detr_command_writes():
    """`python tools/train.py configs/detr/X.py` writes work_dirs/X/iter_{max_iters}.pth."""
    detr = 'configs/detr/detr_r18-dc5_1xb8-3000i_synthetic-shapes.py'
    mtkd = Config.fromfile(osp.join(
        ROOT, 'configs/mtkd/act-detr-mtkd_r18-dc5_1xb8-300i_synthetic-shapes.py'))
    max_iters = Config.fromfile(osp.join(ROOT, detr)).train_cfg.max_iters
    stem = osp.splitext(osp.basename(detr))[0]
    assert mtkd.load_from == f'work_dirs/{stem}/iter_{max_iters}.pth'


def test_readme_recipe_puts_an_mmdet_model_on_the_embedded_data(tmp_path):
    """The README's "your mmdet model on the embedded data" snippet works as written."""
    readme = open(osp.join(ROOT, 'README.md')).read()
    start = readme.index('**Your mmdet model on the embedded data**')
    snippet = readme[start:].split('```python\n', 1)[1].split('```', 1)[0]
    path = tmp_path / 'recipe.py'
    path.write_text(snippet)
    cfg = Config.fromfile(str(path))
    assert cfg.train_dataloader.dataset.type == 'SyntheticShapesDataset'
    assert cfg.val_evaluator.type == 'CocoMetric'
    model = MODELS.build(cfg.model)
    assert model.roi_head.bbox_head.num_classes == 3
