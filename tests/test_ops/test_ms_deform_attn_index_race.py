"""A thread rewriting the index tensors while the op runs can change its result, never crash it.

The op reads ``spatial_shapes`` / ``level_start_index`` once per call into a host copy, validates
that copy and runs the kernel on it (issue 27 item 2). It used to check the tensors, then read
them again for the kernel (without the GIL): another thread writing in between made forward and
backward read far outside ``value`` (the previous build segfaults in this test within a second).
The writer runs in a worker process (msda_race_worker.py) so that a crash fails the test instead
of killing pytest.
"""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest

from mmdet_detrx.ops import native_available

pytestmark = pytest.mark.skipif(not native_available(), reason='mmdet_detrx._C is not built')

WORKER = osp.join(osp.dirname(osp.abspath(__file__)), 'msda_race_worker.py')


def test_concurrent_writer_to_index_tensors_never_crashes_the_op():
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, WORKER, '3'], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    assert proc.returncode == 0, (f'worker died with exit status {proc.returncode}: '
                                  f'{proc.stderr[-2000:]}')
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report['unexpected'] == []
    counts = report['counts']
    # Both outcomes happened: the writer really raced the calls.
    assert counts['ok'] > 0 and counts['rejected'] > 0, counts
