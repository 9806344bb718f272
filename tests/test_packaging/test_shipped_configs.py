"""The configs ship inside the package (mmdet_detrx/.mim/configs) and resolve as mmdet's do:
by path (`python -m mmdet_detrx.config_path NAME`) and as `_base_ = 'mmdet_detrx::dir/x.py'`,
whose inherited objects then build in the `mmdet_detrx` scope."""
import glob
import os.path as osp
import subprocess
import sys

import pytest
from mmengine.config import Config

import mmdet_detrx  # noqa: F401  (registers the mmdet_detrx:: scheme)
from mmdet_detrx.config_path import CONFIG_ROOT, get_config_path, list_configs
from mmdet_detrx.config_path import main as config_path_main

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DEMO = 'demo/deformable-detrx_r18_1xb8-1000i_synthetic-shapes.py'


def test_every_repo_config_ships():
    repo = sorted(osp.relpath(p, osp.join(ROOT, 'configs'))
                  for p in glob.glob(osp.join(ROOT, 'configs', '**', '*.py'), recursive=True)
                  if '_base_' not in p)
    assert list_configs() == repo
    for name in repo:
        with open(get_config_path(name)) as shipped, open(osp.join(ROOT, 'configs', name)) as f:
            assert shipped.read() == f.read()
    assert osp.isfile(osp.join(CONFIG_ROOT, '_base_', 'datasets', 'synthetic_shapes.py'))


def test_config_path_accepts_the_scheme_and_suggests_names():
    assert get_config_path('mmdet_detrx::' + DEMO) == get_config_path(DEMO)
    with pytest.raises(FileNotFoundError, match='did you mean demo/deformable-detrx'):
        get_config_path('demo/deformable-detrx_r18_1xb8-100i_synthetic-shapes.py')
    with pytest.raises(ValueError, match='outside the shipped configs'):
        get_config_path('../__init__.py')


def test_config_path_cli(tmp_path, capsys):
    proc = subprocess.run([sys.executable, '-m', 'mmdet_detrx.config_path', DEMO], cwd=tmp_path,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == get_config_path(DEMO)
    # the package's import does not import the module runpy then runs as __main__
    assert 'RuntimeWarning' not in proc.stderr, proc.stderr
    assert config_path_main([]) == 0 and DEMO in capsys.readouterr().out.split()
    assert config_path_main(['demo/x.py']) == 1
    assert 'no shipped config' in capsys.readouterr().err
    for empty in ('', '  ', 'mmdet_detrx::'):  # issue 27.5: used to end in a traceback
        assert config_path_main([empty]) == 1
        assert 'empty config name' in capsys.readouterr().err


def test_scheme_base_builds_in_the_mmdet_detrx_scope(tmp_path, monkeypatch):
    from mmengine.registry import MODELS, TRANSFORMS
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'mine.py').write_text(f"_base_ = 'mmdet_detrx::{DEMO}'\n"
                                      'model = dict(num_queries=20)\n')
    cfg = Config.fromfile(str(tmp_path / 'mine.py'))
    assert cfg.model._scope_ == 'mmdet_detrx'  # as mmdet:: bases get _scope_='mmdet'
    assert cfg.model.num_queries == 20 and cfg.model.type == 'DeformableDETRX'
    # Built the way the Runner builds, from mmengine's root registries.
    model = MODELS.build(cfg.model)
    assert type(model).__name__ == 'DeformableDETRX' and model.num_queries == 20
    transform = TRANSFORMS.build(cfg.train_dataloader.dataset.pipeline[1])
    assert type(transform).__module__.startswith('mmdet.')  # mmdet's LoadAnnotations, not mmcv's

