"""glibc malloc tuning: freed tensor-sized blocks are reused instead of faulted in again."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from mmdet_detrx.utils import malloc_tuning
from mmdet_detrx.utils.malloc_tuning import MALLOC_ENV, tune_malloc

GLIBC = malloc_tuning._glibc() is not None

# Makes and drops an FFN-sized activation (22223 x 1024 float32, ~87 MiB) and a token tensor
# (~22 MiB) like an encoder layer, and counts the minor page faults of three later rounds.
_FAULTS_SCRIPT = textwrap.dedent("""
    import importlib.util, json, resource, sys
    import torch
    # the module alone: importing the package would register mmdet's models first
    spec = importlib.util.spec_from_file_location('malloc_tuning', sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.tune_malloc()
    torch.set_num_threads(1)

    def one_round():
        ffn = torch.ones(22223, 1024)
        tokens = torch.ones(22223, 256)
        return float(ffn[-1, -1] + tokens[-1, -1])

    for _ in range(6):  # the heap settles within the first few rounds (2-4 on glibc 2.36)
        one_round()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        one_round()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps(dict(applied=result[0], line=result[1], faults=faults)))
""")


def _run_fault_script(**env):
    full_env = {k: v for k, v in os.environ.items()
                if k != MALLOC_ENV and not k.startswith('MALLOC_')}
    full_env.update(env)
    out = subprocess.run([sys.executable, '-c', _FAULTS_SCRIPT, malloc_tuning.__file__],
                         env=full_env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason='glibc malloc only')
def test_tuned_process_reuses_freed_blocks_without_page_faults():
    default = _run_fault_script(**{MALLOC_ENV: 'default'})
    tuned = _run_fault_script()
    assert not default['applied'] and 'MMDET_DETRX_MALLOC=default' in default['line']
    assert tuned['applied'] and 'mmap_threshold 1024 MiB, trim_threshold off' in tuned['line']
    # 3 rounds x ~110 MiB of fresh pages: ~84 000 faults of 4 KiB with glibc's defaults
    assert default['faults'] > 20000
    assert tuned['faults'] < default['faults'] / 20


@pytest.fixture
def fresh_state(monkeypatch):
    """An unapplied module state whose mallopt calls are recorded, not made."""
    calls = []

    class FakeLibc:
        gnu_get_libc_version = object()

        class mallopt:  # noqa: N801  (stands in for the ctypes function)
            argtypes = restype = None

            def __new__(cls, param, value):
                calls.append((param, value))
                return 1

    monkeypatch.setattr(malloc_tuning, '_applied', False)
    monkeypatch.setattr(malloc_tuning, '_glibc', lambda: FakeLibc)
    for name in list(os.environ):
        if name == MALLOC_ENV or name.startswith('MALLOC_') or name in ('LD_PRELOAD',
                                                                        'GLIBC_TUNABLES'):
            monkeypatch.delenv(name)
    return calls


def test_applies_the_three_settings_once(fresh_state):
    applied, line = tune_malloc()
    assert applied and line.startswith('malloc: glibc tuned')
    assert fresh_state == [(param, value) for _, param, value in malloc_tuning.MALLOC_SETTINGS]
    assert tune_malloc() == (True, 'malloc: already tuned in this process')
    assert len(fresh_state) == 3


@pytest.mark.parametrize('env, reason', [
    ({MALLOC_ENV: 'default'}, 'MMDET_DETRX_MALLOC=default'),
    ({'LD_PRELOAD': '/usr/lib/x86_64-linux-gnu/libjemalloc.so.2'}, 'jemalloc is preloaded'),
    ({'MALLOC_TRIM_THRESHOLD_': '100000'}, 'MALLOC_TRIM_THRESHOLD_'),
    ({'GLIBC_TUNABLES': 'glibc.malloc.mmap_threshold=65536'}, 'GLIBC_TUNABLES'),
])
def test_leaves_malloc_alone_when_told_or_already_set(fresh_state, monkeypatch, env, reason):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    applied, line = tune_malloc()
    assert not applied and reason in line
    assert fresh_state == []


def test_not_glibc_changes_nothing(fresh_state, monkeypatch):
    monkeypatch.setattr(malloc_tuning, '_glibc', lambda: None)
    assert tune_malloc() == (False, 'malloc: left as is (not glibc)')


def test_refused_setting_is_reported(fresh_state, monkeypatch):
    class RefusingLibc:
        gnu_get_libc_version = object()

        class mallopt:  # noqa: N801
            argtypes = restype = None

            def __new__(cls, param, value):
                return 0 if param == malloc_tuning._M_MMAP_THRESHOLD else 1

    monkeypatch.setattr(malloc_tuning, '_glibc', lambda: RefusingLibc)
    applied, line = tune_malloc()
    assert not applied and line == 'malloc: glibc refused mmap_threshold'


def test_unknown_choice_names_the_variable(fresh_state, monkeypatch):
    monkeypatch.setenv(MALLOC_ENV, 'fast')
    with pytest.raises(ValueError, match="MMDET_DETRX_MALLOC must be one of .* got 'fast'"):
        tune_malloc()
