"""tools/demo.py (``make demo``) end to end on a 16-image dataset: trains, tests, reports mAP."""
import os
import os.path as osp
import subprocess
import sys

from _helpers import REPO_ROOT
from _helpers.synthetic_shapes import tiny_run_options


def test_demo_trains_tests_and_prints_the_map(tmp_path):
    work_dir = str(tmp_path / 'demo')
    env = dict(os.environ, OMP_NUM_THREADS='1', MMDET_DETRX_DATA_ROOT=str(tmp_path / 'shapes'))
    proc = subprocess.run(
        [sys.executable, 'tools/demo.py', '--work-dir', work_dir,
         *tiny_run_options(max_iters=2, ckpt_interval=2)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert osp.isfile(osp.join(work_dir, 'iter_2.pth'))
    assert 'Demo finished: checkpoint' in proc.stdout and 'val bbox mAP = ' in proc.stdout
    assert osp.isfile(osp.join(tmp_path, 'shapes', 'annotations', 'val.json'))
