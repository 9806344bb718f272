"""tools/demo.py (``make demo``) end to end on a 16-image dataset: trains, tests, reports mAP,
draws its detections."""
import os
import os.path as osp
import re
import subprocess
import sys

import cv2

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
    # It ends with pictures of its detections on the val images (4 here), paths printed.
    lines = proc.stdout.split('next to the ground truth (left) on 4 val images:')[1].splitlines()
    drawn = [line.split()[0] for line in lines if line.strip()]
    assert all(re.search(r'\(\d+ objects, \d+ detections >= 0.3', line) for line in lines[1:])
    assert drawn == [osp.join(work_dir, 'detections', f'{i:06d}.png') for i in range(4)]
    for i, path in enumerate(drawn):  # ground truth | detections, each enlarged 3x
        height, width = cv2.imread(osp.join(tmp_path, 'shapes', 'val', f'{i:06d}.png')).shape[:2]
        assert cv2.imread(path).shape == (3 * height, 2 * 3 * width, 3)
