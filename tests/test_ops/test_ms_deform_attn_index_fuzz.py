"""Index tensors with extreme values never crash multi-scale deformable attention.

``spatial_shapes`` / ``level_start_index`` are all the kernels trust to stay inside ``value``. The
cases here include the ones that used to pass both checks and segfault: H * W or the sum over
levels overflowing int64 so that the wrapped sum equals S, with starts equal to the wrapped
cumsum. Each case runs in a worker process (msda_index_worker.py): a crash fails the test with
the case instead of killing pytest. Every case must either be rejected with an error naming an
index argument, or (when the table is valid in exact integer arithmetic) match the reference.
"""
import json
import os
import os.path as osp
import select
import subprocess
import sys
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mmdet_detrx.ops import native_available

pytestmark = pytest.mark.skipif(not native_available(), reason='mmdet_detrx._C is not built')

WORKER = osp.join(osp.dirname(osp.abspath(__file__)), 'msda_index_worker.py')
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
EXTREMES = (0, 1, -1, 2, 3, 2**31 - 1, 2**31, 2**32, 2**32 + 1, 2**62, 3 * 2**61, INT64_MAX,
            INT64_MIN, -2**62, -2**32)
DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() and native_available()
                     and torch._C._dispatch_has_kernel_for_dispatch_key(
                         'detrx::ms_deform_attn_forward', 'CUDA') else [])


def wrap(x):
    """x as int64 arithmetic would leave it (two's complement wrap-around)."""
    return (x + 2**63) % 2**64 - 2**63


class IsolatedWorker:
    """One long-lived worker process; restarted after a crash."""

    def __init__(self):
        self.proc = None
        self.stderr = None

    def start(self):
        self.stderr = tempfile.TemporaryFile(mode='w+')
        env = dict(os.environ, OMP_NUM_THREADS='1')
        self.proc = subprocess.Popen([sys.executable, WORKER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                                     env=env)
        if self._read_line(timeout=300) != 'ready':
            raise RuntimeError(f'the worker did not start: {self._stderr_tail()}')

    def _read_line(self, timeout):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        return self.proc.stdout.readline().strip()

    def _stderr_tail(self):
        self.stderr.seek(0)
        return self.stderr.read()[-2000:]

    def run(self, case, timeout=120):
        """The worker's results for `case`, or a dict with 'crashed' / 'hung'."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(json.dumps(case) + '\n')
        self.proc.stdin.flush()
        line = self._read_line(timeout)
        if line is None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            return {'hung': f'no answer within {timeout} s'}
        if not line:  # EOF: the worker died on this case
            returncode = self.proc.wait()
            self.proc = None
            return {'crashed': f'exit status {returncode}: {self._stderr_tail()}'}
        return json.loads(line)

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


@pytest.fixture(scope='module')
def worker():
    runner = IsolatedWorker()
    yield runner
    runner.close()


def table_is_valid(shapes, starts, num_value):
    """The op's rules in exact (Python int) arithmetic."""
    if any(h <= 0 or w <= 0 for h, w in shapes) or sum(h * w for h, w in shapes) != num_value:
        return False, False
    cumsum = [sum(h * w for h, w in shapes[:level]) for level in range(len(shapes))]
    return True, list(starts) == cumsum


def check_case(worker, shapes, starts, num_value, device='cpu', seed=0):
    case = dict(shapes=[list(s) for s in shapes], starts=list(starts), num_value=num_value,
                device=device, seed=seed)
    results = worker.run(case)
    assert 'crashed' not in results and 'hung' not in results, (case, results)
    shapes_valid, starts_valid = table_is_valid(shapes, starts, num_value)
    expectations = {'reference': shapes_valid, 'wrapper': shapes_valid and starts_valid,
                    'forward': shapes_valid and starts_valid,
                    'backward': shapes_valid and starts_valid}
    for path, should_run in expectations.items():
        result = results[path]
        if should_run:
            assert result['status'] == 'ok', (path, case, result)
            assert result['error'] is not None and result['error'] <= 1e-10, (path, case, result)
        else:
            assert result['status'] == 'raised', (path, case, result)
            expected_type = 'ValueError'  # the one check of each path: C++ or Python
            assert result['type'] == expected_type, (path, case, result)
            assert ('spatial_shapes' in result['message']
                    or 'level_start_index' in result['message']), (path, case, result)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('shapes,starts,num_value', [
    # H * W = 2^64 wraps to 0: the wrapped sum equals S = 56 and starts match the wrapped cumsum.
    ([(2**32, 2**32), (7, 8)], [0, 0], 56),
    # The sum of two products wraps: 2^63 + 2^63 + 56 = 56 (mod 2^64).
    ([(2**62, 2), (2**62, 2), (7, 8)], [0, wrap(2**63), 0], 56),
    # Huge negative starts matching the wrapped cumsum of huge shapes.
    ([(7, 8), (3, 2**62), (1, 2**62)], [0, 56, wrap(56 + 3 * 2**62)], 56 + wrap(2**64)),
    ([(7, 8), (2**61, 2), (2**61, 6)], [0, 56, wrap(56 + 2**62)], 56),
    # (2^32 + 1) * (2^32 - 1) = -1 (mod 2^64), so the sum with 57 is 56.
    ([(2**32 + 1, 2**32 - 1), (1, 57)], [0, -1], 56),
    ([(INT64_MAX, INT64_MAX)], [0], 1),  # (2^63 - 1)^2 = 1 (mod 2^64)
    ([(-1, -56)], [0], 56),  # negative H and W whose product is S
    ([(7, 8), (3, 4)], [0, INT64_MIN], 68),
    ([(7, 8), (3, 4)], [0, 56], 68),  # valid: runs and matches the reference
])
def test_overflowing_index_tensors_are_rejected(worker, device, shapes, starts, num_value):
    check_case(worker, shapes, starts, num_value, device)


sizes = st.one_of(st.integers(1, 8), st.sampled_from(EXTREMES), st.integers(INT64_MIN, INT64_MAX))


@st.composite
def index_tables(draw):
    """Level tables of extreme values, often completed so that the int64-wrapped sum is S and
    the starts are the wrapped cumsum: exactly what a check with unchecked arithmetic accepts."""
    num_value = draw(st.integers(1, 64), label='num_value')
    shapes = [(draw(sizes), draw(sizes)) for _ in range(draw(st.integers(0, 3)))]
    wrapped_sum = wrap(sum(h * w for h, w in shapes))
    if draw(st.booleans()) and wrap(num_value - wrapped_sum) > 0:
        shapes.append((1, wrap(num_value - wrapped_sum)))  # wrapped sum == num_value
    elif not shapes or draw(st.booleans()):
        shapes.append((draw(st.integers(1, 8)), draw(st.integers(1, 8))))
    starts_kind = draw(st.sampled_from(['wrapped_cumsum', 'extreme']), label='starts')
    if starts_kind == 'wrapped_cumsum':
        starts = [wrap(sum(h * w for h, w in shapes[:level])) for level in range(len(shapes))]
    else:
        starts = [draw(st.one_of(st.sampled_from(EXTREMES), st.integers(INT64_MIN, INT64_MAX)))
                  for _ in shapes]
    return shapes, starts, num_value


FUZZ_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize('device', DEVICES)
@settings(max_examples=60, **FUZZ_SETTINGS)
@given(table=index_tables(), seed=st.integers(0, 2**16))
@example(table=([(2**32, 2**32), (1, 5)], [0, 0], 5), seed=0)
def test_fuzz_extreme_index_tensors(worker, device, table, seed):
    shapes, starts, num_value = table
    check_case(worker, shapes, starts, num_value, device, seed)


@pytest.mark.slow
@pytest.mark.parametrize('device', DEVICES)
@settings(max_examples=2000, **FUZZ_SETTINGS)
@given(table=index_tables(), seed=st.integers(0, 2**16))
def test_fuzz_extreme_index_tensors_long(worker, device, table, seed):
    shapes, starts, num_value = table
    check_case(worker, shapes, starts, num_value, device, seed)


def test_worker_reports_a_crash_instead_of_dying_with_pytest(tmp_path, monkeypatch):
    """The isolation itself: a worker that segfaults is reported as crashed."""
    crashing = tmp_path / 'crashing_worker.py'
    crashing.write_text('import ctypes, sys\nprint("ready", flush=True)\nsys.stdin.readline()\n'
                        'ctypes.string_at(0)\n')
    monkeypatch.setattr(sys.modules[__name__], 'WORKER', str(crashing))
    runner = IsolatedWorker()
    result = runner.run({'shapes': [[1, 1]]})
    assert 'crashed' in result and '-11' in result['crashed']
