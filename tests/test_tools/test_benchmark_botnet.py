import os.path as osp
import subprocess
import sys

import cv2

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def test_benchmark_botnet_writes_table_and_png(tmp_path):
    table, png = tmp_path / 'bench.md', tmp_path / 'bench.png'
    proc = subprocess.run(
        [sys.executable, 'tools/analysis/benchmark_botnet.py', '--sizes', '96x128', '--repeat',
         '1', '--warmup', '0', '--threads', '1', '--out', str(table), '--out-png', str(png)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in table.read_text().splitlines() if line.startswith('| R50')
            or line.startswith('| BoT50')]
    assert len(rows) == 2 and all('96x128' in row for row in rows)
    image = cv2.imread(str(png))
    assert image is not None and image.shape[:2] == (400, 1000) and image.std() > 0
