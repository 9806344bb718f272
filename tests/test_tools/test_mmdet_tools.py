"""mmdet's own tools/train.py and tools/test.py (the ones in mmdet's package) on our configs."""
import os
import os.path as osp
import subprocess
import sys

import mmdet
import pytest
import torch
from _helpers.synthetic_shapes import tiny_run_options

from mmdet_detrx.utils import load_checkpoint_file

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DEMO = 'configs/demo/deformable-detrx_r18_1xb8-1000i_synthetic-shapes.py'
MMDET_TOOLS = osp.join(osp.dirname(mmdet.__file__), '.mim', 'tools')


def _mmdet_tool(tool, args, data_root):
    # mmdet's tool knows nothing of our --cfg-options data_root=: the environment key moves the
    # embedded dataset for any tool (mmengine substitutes it when reading the config).
    env = dict(os.environ, OMP_NUM_THREADS='1', MMDET_DETRX_DATA_ROOT=data_root)
    env.pop('MMDET_DETRX_TRUSTED_CHECKPOINTS', None)
    proc = subprocess.run([sys.executable, osp.join(MMDET_TOOLS, tool), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the CPU path of --amp')
def test_mmdet_train_amp_on_cpu_then_resume_then_tta(tmp_path):
    data_root, work_dir = str(tmp_path / 'shapes'), str(tmp_path / 'work')
    log = _mmdet_tool('train.py', [DEMO, '--work-dir', work_dir, '--amp', *tiny_run_options(1)],
                      data_root)
    assert 'bfloat16 autocast on CPU' in log
    assert osp.isfile(osp.join(data_root, 'annotations', 'val.json'))
    assert osp.isfile(osp.join(work_dir, 'iter_1.pth'))
    # --resume (auto) through mmengine's own loader: our safe loader reads mmengine's checkpoint
    log = _mmdet_tool('train.py', [DEMO, '--work-dir', work_dir, '--resume', *tiny_run_options(2)],
                      data_root)
    assert 'resumed epoch: 0, iter: 1' in log
    assert load_checkpoint_file(osp.join(work_dir, 'iter_2.pth'))['meta']['iter'] == 2
    log = _mmdet_tool('test.py', [DEMO, osp.join(work_dir, 'iter_2.pth'), '--tta', '--work-dir',
                                  str(tmp_path / 'tta'), *tiny_run_options(2)], data_root)
    assert 'coco/bbox_mAP' in log and 'Cannot find ``tta_model``' not in log
