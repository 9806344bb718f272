"""build_tools/gpu_check.sh without a GPU: the script parses (bash -n, shellcheck where installed),
refuses bad arguments, refuses to run for real without a CUDA device, and its dry run exercises
every CPU-reachable stage and writes a report that says plainly nothing ran on a GPU (--runslow).
"""
import os
import os.path as osp
import shutil
import subprocess
import sys

import pytest
import torch

from mmdet_detrx.ops import native_available

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
SCRIPT = osp.join(ROOT, 'build_tools', 'gpu_check.sh')


def run_script(*args, timeout=300, **env):
    full_env = dict(os.environ, PYTHON=sys.executable, **env)
    return subprocess.run(['bash', SCRIPT, *args], cwd=ROOT, env=full_env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)


def test_script_parses():
    proc = subprocess.run(['bash', '-n', SCRIPT], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.skipif(shutil.which('shellcheck') is None, reason='shellcheck not installed')
def test_shellcheck_clean():
    proc = subprocess.run(['shellcheck', SCRIPT], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0, proc.stdout


def test_bad_arguments_exit_2():
    missing = run_script()
    assert missing.returncode == 2 and 'OUTDIR missing' in missing.stdout
    unknown = run_script('--frobnicate', 'out')
    assert unknown.returncode == 2 and 'unknown option --frobnicate' in unknown.stdout
    two = run_script('a', 'b')
    assert two.returncode == 2 and 'one OUTDIR only' in two.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason='a GPU is present')
def test_real_run_without_a_gpu_fails_with_a_report(tmp_path):
    proc = run_script(str(tmp_path))
    assert proc.returncode == 1, proc.stdout
    report = (tmp_path / 'report.md').read_text()
    assert 'torch sees no CUDA device' in report
    assert 'DRY RUN' not in report


@pytest.mark.slow  # ~40 s on 2 cores: five interpreter starts, a pytest run, a CPU benchmark
@pytest.mark.skipif(not native_available(), reason='mmdet_detrx._C is not built')
def test_dry_run_runs_the_cpu_reachable_stages(tmp_path):
    proc = run_script('--dry-run', str(tmp_path / 'out'), BENCH_REPEAT='1')
    assert proc.returncode == 0, proc.stdout
    assert sorted(os.listdir(tmp_path / 'out')) == ['logs.txt', 'report.md']
    report = (tmp_path / 'out' / 'report.md').read_text()
    assert '**DRY RUN: nothing ran on a GPU.**' in report
    for stage in ('env', 'probe', 'tests', 'small_case', 'bench_float32'):
        assert f'| {stage} | passed |' in report, report
    assert '| build | dry run |' in report
    assert 'small case ok' in report
    # the benchmark table was parsed: a native row with a ratio against the reference
    assert '| float32 | small |' in report
    assert 'Device state' in report and 'unchanged' in report
    logs = (tmp_path / 'out' / 'logs.txt').read_text()
    assert 'needs a CUDA device' in logs  # the CUDA tests were collected and skipped
