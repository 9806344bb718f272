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
    bot_row = next(row for row in rows if row.startswith('| BoT50'))
    assert bot_row.rstrip(' |').endswith('x')  # peak memory relative to R50 at the same size
    image = cv2.imread(str(png))
    assert image is not None and image.shape[:2] == (400, 1000) and image.std() > 0


def test_benchmark_botnet_rejects_bad_query_chunk_size():
    proc = subprocess.run(
        [sys.executable, 'tools/analysis/benchmark_botnet.py', '--sizes', '96x128',
         '--query-chunk-size', '0'], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and '--query-chunk-size' in proc.stderr
