"""A wheel of mmdet-detrx works outside the clone: built with `pip wheel --no-build-isolation`
against this environment's torch, installed with `pip install --target` into a fresh directory,
and used from an empty working directory with the clone not importable. There the native op
loads, the shipped configs resolve (by path and as `mmdet_detrx::` base), mmdet's *own*
tools/train.py (with --auto-scale-lr) trains a shipped config for 2 iterations, and our tools
run without the clone: `detrx-train`, `python -m mmdet_detrx.tools.test` and `detrx-export`.

The build reuses build/'s objects when they are current (ninja), so it costs a link when the
extension was built before and one compile (about a minute on 2 cores) otherwise.
"""
import os
import os.path as osp
import re
import subprocess
import sys
import zipfile

import mmdet
import pytest
import torch
from _helpers.synthetic_shapes import tiny_run_options

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
MMDET_TRAIN = osp.join(osp.dirname(mmdet.__file__), '.mim', 'tools', 'train.py')
DEMO = 'demo/deformable-detrx_r18_1xb8-1000i_synthetic-shapes.py'


def run(cmd, **kwargs):
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          **kwargs)
    assert proc.returncode == 0, f'{" ".join(map(str, cmd))} failed:\n{proc.stdout[-6000:]}'
    return proc.stdout


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp('wheel')
    env = dict(os.environ, MAX_JOBS=os.environ.get('MAX_JOBS', '2'))
    env.pop('MMDET_DETRX_NO_EXT', None)
    run([sys.executable, '-m', 'pip', 'wheel', '--no-build-isolation', '--no-deps', '-q', ROOT,
         '-w', str(out)], env=env, timeout=900)
    (path, ) = out.glob('mmdet_detrx-*.whl')
    return path


@pytest.fixture(scope='module')
def installed(wheel, tmp_path_factory):
    """(site dir, environment, empty working dir): only the wheel's mmdet_detrx is importable."""
    site = tmp_path_factory.mktemp('site')
    run([sys.executable, '-m', 'pip', 'install', '--no-deps', '--no-compile', '-q', '--target',
         str(site), str(wheel)], timeout=300)
    env = dict(os.environ, PYTHONPATH=str(site), PYTHONNOUSERSITE='1', OMP_NUM_THREADS='2')
    return site, env, tmp_path_factory.mktemp('empty_cwd')


def test_wheel_contents(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith('.dist-info/METADATA')))
    assert any(re.fullmatch(r'mmdet_detrx/_C\..*\.so', n) for n in names)
    assert f'mmdet_detrx/.mim/configs/{DEMO}' in names
    assert 'mmdet_detrx/.mim/configs/_base_/datasets/synthetic_shapes.py' in names
    assert 'mmdet_detrx/.mim/model-index.yml' in names
    assert not any(n.startswith(('tests/', 'tools/', 'configs/', 'build_tools/')) for n in names)
    major, minor = torch.__version__.split('+')[0].split('.')[:2]
    assert f'Requires-Dist: torch=={major}.{minor}.*' in metadata.decode()


# One interpreter for the import-level checks (each start imports mmdet: seconds on 2 cores).
CHECKS = f"""
import mmdet_detrx, mmdet_detrx.ops as ops
from mmdet_detrx.config_path import main
from mmengine.config import Config
from mmengine.registry import MODELS
print('package', mmdet_detrx.__file__)
print('native', ops.native_available())
main(['{DEMO}'])
cfg = Config.fromfile('mine.py')
model = MODELS.build(cfg.model)
print('base', type(model).__name__, model.num_queries)
"""


def test_installed_package_loads_its_extension_and_shipped_configs(installed):
    site, env, cwd = installed
    (cwd / 'mine.py').write_text(f"_base_ = 'mmdet_detrx::{DEMO}'\n"
                                 'model = dict(num_queries=20)\n')
    lines = run([sys.executable, '-c', CHECKS], cwd=cwd, env=env, timeout=300).splitlines()
    package = next(line.split(' ', 1)[1] for line in lines if line.startswith('package '))
    assert package.startswith(str(site)), package  # the wheel's copy, not the clone's
    assert 'native True' in lines
    assert osp.join(str(site), 'mmdet_detrx', '.mim', 'configs', DEMO) in lines
    assert 'base DeformableDETRX 20' in lines  # `_base_ = 'mmdet_detrx::...'` outside the clone


def test_mmdet_train_runs_a_shipped_config_from_an_empty_dir(installed):
    site, env, cwd = installed
    config = osp.join(str(site), 'mmdet_detrx', '.mim', 'configs', DEMO)  # what config_path says
    work_dir = cwd / 'work_dir'
    # A small embedded dataset (generated into the working directory on first use).
    loader = ['num_workers=0', 'persistent_workers=False', 'batch_size=2',
              'dataset.spec.num_train=8', 'dataset.spec.num_val=2']
    out = run([sys.executable, MMDET_TRAIN, config, '--work-dir', str(work_dir),
               '--auto-scale-lr', '--cfg-options', 'train_cfg.max_iters=2',
               'default_hooks.logger.interval=1',
               *(f'train_dataloader.{o}' for o in loader), 'val_cfg=None',
               'val_dataloader=None', 'val_evaluator=None'],
              cwd=cwd, env=env, timeout=600)
    assert re.search(r'Iter\(train\) \[2/2\]', out), out[-3000:]
    # --auto-scale-lr: 1 process x batch 2 against the config's base_batch_size 8.
    assert 'LR is set based on batch size of 8 and the current batch size is 2' in out
    assert (work_dir / 'iter_2.pth').is_file()


def test_our_tools_train_test_export_from_an_empty_dir(installed):
    """The console scripts and `python -m` forms of train, test and ONNX export, no clone."""
    pytest.importorskip('onnx')
    site, env, cwd = installed
    scripts = site / 'bin'  # where `pip install --target` puts console scripts
    config = osp.join(str(site), 'mmdet_detrx', '.mim', 'configs', DEMO)
    work_dir = cwd / 'detrx_work'
    options = tiny_run_options(max_iters=2, ckpt_interval=2,
                               extra=[f'data_root={cwd / "shapes"}'])
    out = run([str(scripts / 'detrx-train'), config, '--work-dir', str(work_dir), *options],
              cwd=cwd, env=env, timeout=600)
    assert re.search(r'Iter\(train\) \[2/2\]', out), out[-3000:]
    checkpoint = work_dir / 'iter_2.pth'
    assert checkpoint.is_file()
    out = run([sys.executable, '-m', 'mmdet_detrx.tools.test', config, str(checkpoint),
               '--work-dir', str(cwd / 'detrx_test'), *options], cwd=cwd, env=env, timeout=600)
    assert 'coco/bbox_mAP' in out
    onnx_file = cwd / 'demo.onnx'
    out = run([str(scripts / 'detrx-export'), config, str(checkpoint), '--out', str(onnx_file),
               '--shape', '64', '64'], cwd=cwd, env=env, timeout=600)
    assert f'wrote {onnx_file}' in out and onnx_file.stat().st_size > 0
