"""The CPU kernels' instruction-set level: chosen at load time, forced by
MMDET_DETRX_CPU_CAPABILITY, refused clearly when the CPU lacks it, equal across levels.

Each level runs in a subprocess (the level is read once, when mmdet_detrx._C loads).
"""
import json
import os
import os.path as osp
import re
import shutil
import subprocess
import sys

import pytest
import torch

from mmdet_detrx.ops import native_available

pytestmark = pytest.mark.skipif(not native_available(), reason='mmdet_detrx._C is not built')

ENV = 'MMDET_DETRX_CPU_CAPABILITY'
HERE = osp.dirname(osp.abspath(__file__))
SUPPORTED = list(torch.ops.detrx.cpu_capabilities()) if native_available() else []
# The level chosen when none is forced (ops/cpu/cpu_capability.cpp, automatic_level): the best
# one supported (measured the fastest, docs/msda.md "CPU kernel").
AUTOMATIC = SUPPORTED[-1] if SUPPORTED else None
# Documented tolerance between levels (docs/msda.md "CPU kernel"): FMA contraction and wider
# vectors change the last bits; relative to max(max |expected|, 1).
LEVEL_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3,
                   torch.bfloat16: 1e-2}


def run_python(code, level=None, extra_env=None, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS='1', **(extra_env or {}))
    env.pop(ENV, None)
    if level is not None:
        env[ENV] = level
    return subprocess.run([sys.executable, '-c', code], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env, timeout=timeout)


REPORT = ('import json, torch, mmdet_detrx.ops\n'
          'print(json.dumps([torch.ops.detrx.cpu_capability(), '
          'list(torch.ops.detrx.cpu_capabilities())]))\n')


def test_default_is_the_best_level_this_cpu_supports():
    if os.environ.get(ENV):  # this process was started with a forced level
        proc = run_python(REPORT)
        assert proc.returncode == 0, proc.stderr
        chosen, supported = json.loads(proc.stdout)
    else:
        chosen, supported = torch.ops.detrx.cpu_capability(), SUPPORTED
    assert supported[0] == 'default' and supported == SUPPORTED
    assert chosen == AUTOMATIC == supported[-1]
    # With the best levels hidden by the test hook, the best one left runs.
    for hidden in ('avx512', 'avx2,avx512'):
        proc = run_python(REPORT, extra_env={'MMDET_DETRX_TESTING_CPU_LACKS': hidden})
        assert proc.returncode == 0, proc.stderr
        left = [level for level in SUPPORTED if level not in hidden.split(',')]
        assert json.loads(proc.stdout) == [left[-1], left]


def test_unknown_level_is_refused_naming_the_supported_ones():
    proc = run_python('import mmdet_detrx.ops', level='avx1024')
    assert proc.returncode != 0
    assert f'{ENV}=avx1024: unknown level (known: default, avx2, avx512)' in proc.stderr
    assert 'levels available here: ' + ', '.join(SUPPORTED) in proc.stderr
    assert 'RuntimeError' in proc.stderr  # not an ImportError: no silent PyTorch fallback


def test_level_the_cpu_lacks_is_refused_not_run():
    """MMDET_DETRX_TESTING_CPU_LACKS makes the CPU look as if it lacked AVX-512: forcing it must
    fail naming the levels available, never execute an instruction the CPU lacks."""
    if 'avx512' not in SUPPORTED:
        pytest.skip('this build or CPU has no avx512')
    proc = run_python('import mmdet_detrx.ops', level='avx512',
                      extra_env={'MMDET_DETRX_TESTING_CPU_LACKS': 'avx512'})
    assert proc.returncode != 0
    assert (f'{ENV}=avx512: this CPU does not support avx512; levels available here: '
            'default, avx2') in proc.stderr


# One subprocess per level: the level it runs at, then outputs and gradients of the raw ops
# (C = 32, the compiled-for channel count, and C = 13; with the (batch, head) pairs split per
# level at 2 threads or not) at 1 and 2 threads.
OUTPUTS = '''
import sys, torch, mmdet_detrx.ops
level = torch.ops.detrx.cpu_capability()
g = torch.Generator().manual_seed(0)
shapes = torch.tensor([[9, 11], [5, 6], [3, 3], [1, 2]])
sizes = shapes.prod(1)
starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
cases = []
for C in (32, 13):
    value = torch.randn(2, int(sizes.sum()), 3, C, generator=g, dtype=torch.float64)
    loc = torch.rand(2, 40, 3, 4, 4, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
    w = torch.rand(2, 40, 3, 4, 4, generator=g, dtype=torch.float64)
    go = torch.randn(2, 40, 3 * C, generator=g, dtype=torch.float64)
    for vd, cd in [(torch.float64, torch.float64), (torch.float32, torch.float32),
                   (torch.bfloat16, torch.float32), (torch.float16, torch.float16)]:
        cases.append(((value.to(vd), shapes, starts, loc.to(cd), w.to(cd)), go.to(vd)))
# 3 (batch, head) pairs: at 2 threads the backward splits them per level, so its loops over a
# query's points run over 5 points per task instead of 20 (other vector body / remainder mixes).
value = torch.randn(1, int(sizes.sum()), 3, 32, generator=g, dtype=torch.float64)
loc = torch.rand(1, 40, 3, 4, 5, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
w = torch.rand(1, 40, 3, 4, 5, generator=g, dtype=torch.float64)
go = torch.randn(1, 40, 3 * 32, generator=g, dtype=torch.float64)
for dtype in (torch.float64, torch.float32):
    cases.append(((value.to(dtype), shapes, starts, loc.to(dtype), w.to(dtype)), go.to(dtype)))
runs = []
for threads in (1, 2):
    torch.set_num_threads(threads)
    runs.append([[torch.ops.detrx.ms_deform_attn_forward(*args, 64),
                  *torch.ops.detrx.ms_deform_attn_backward(*args, go, 64)]
                 for args, go in cases])
# detrx::dropout (its kernel is compiled per level too): every dtype, an odd length that ends
# in a partial block, at 1 and 2 threads.
x = torch.randn(3 * 16384 * 2 + 1001, generator=g, dtype=torch.float64)
dropouts = []
for threads in (1, 2):
    torch.set_num_threads(threads)
    dropouts.append([torch.ops.detrx.dropout(x.to(dtype), 0.3, 12345)
                     for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16)])
torch.save({'level': level, 'runs': runs, 'dropout': dropouts}, sys.argv[1])
'''


@pytest.fixture(scope='module')
def level_outputs(tmp_path_factory):
    """{level: (level reported, [results at 1 thread, at 2 threads])}, computed once."""
    results = {}
    for level in SUPPORTED:
        path = str(tmp_path_factory.mktemp('levels') / f'{level}.pt')
        env = dict(os.environ, OMP_NUM_THREADS='2', **{ENV: level})
        proc = subprocess.run([sys.executable, '-c', OUTPUTS, path], stderr=subprocess.PIPE,
                              text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        saved = torch.load(path)
        results[level] = (saved['level'], saved['runs'], saved['dropout'])
    return results


@pytest.mark.parametrize('level', SUPPORTED)
def test_each_level_can_be_forced_and_is_deterministic(level, level_outputs):
    reported, (one_thread, two_threads), _ = level_outputs[level]
    assert reported == level
    # Backward (and forward) bitwise reproducible, whatever the thread count.
    assert all(torch.equal(x, y) for r1, r2 in zip(one_thread, two_threads)
               for x, y in zip(r1, r2))


@pytest.mark.parametrize('level', [lv for lv in SUPPORTED if lv != 'default'])
def test_levels_agree_with_the_baseline_within_tolerance(level, level_outputs):
    baseline, actual = level_outputs['default'][1][0], level_outputs[level][1][0]
    for case, (expected_case, actual_case) in enumerate(zip(baseline, actual)):
        for name, e, a in zip(('output', 'grad_value', 'grad_sampling_locations',
                               'grad_attention_weights'), expected_case, actual_case):
            assert a.dtype == e.dtype and a.shape == e.shape
            scale = max(e.double().abs().max().item(), 1.0)
            tol = LEVEL_TOLERANCE[e.dtype] * scale
            torch.testing.assert_close(a.double(), e.double(), atol=tol, rtol=0,
                                       msg=lambda m, n=name, c=case: f'case {c} {n}: {m}')


@pytest.mark.parametrize('level', SUPPORTED)
def test_dropout_is_bitwise_the_same_at_every_level_and_thread_count(level, level_outputs):
    # The mask is a hash of (seed, index) and a kept value one multiply rounded once: no level
    # or thread count may change a bit.
    expected = level_outputs['default'][2][0]
    for run in level_outputs[level][2]:
        assert all(torch.equal(a, e) for a, e in zip(run, expected, strict=True))
    assert all((out != 0).float().mean().item() == pytest.approx(0.7, abs=0.01)
               for out in expected)


# The op tests, rerun in a subprocess at the levels other than the automatic one (this process
# already runs them there, unless started with a forced level): a subset by default, every test
# with --runslow.
OP_TESTS_SUBSET = ('match_reference or gradcheck or outside or deterministic or mixed '
                   'or non_contiguous or empty or fuzz')


@pytest.mark.parametrize('level', [lv for lv in SUPPORTED if lv != AUTOMATIC])
def test_op_tests_pass_at_each_forced_level(level, request):
    args = [sys.executable, '-m', 'pytest', '-q', '-x', '-p', 'no:cacheprovider',
            osp.join(HERE, 'test_ms_deform_attn.py')]
    if not request.config.getoption('--runslow'):
        args += ['-k', OP_TESTS_SUBSET]
    env = dict(os.environ, OMP_NUM_THREADS='1', **{ENV: level})
    proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, timeout=900, cwd=osp.dirname(osp.dirname(HERE)))
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert re.search(r'\d+ passed', proc.stdout), proc.stdout[-1000:]


def test_no_vector_extension_instruction_outside_the_per_isa_kernels():
    """The wheel stays portable: every AVX / AVX-512 (VEX / EVEX-encoded, v-prefixed)
    instruction of _C.so lies in a function of a per-ISA namespace, which only runs when the
    CPU has that level, or in a local symbol: a compiler clone such as `std::vector<double>::
    vector(...) [clone .constprop.0]` that a per-ISA object made of a library function is
    visible to that object alone, so only its per-ISA callers reach it (the baseline objects
    have no VEX code). (Shared inline code the per-ISA objects also emit is linked from the
    baseline objects first; this checks that it stayed so.)"""
    objdump, nm = shutil.which('objdump'), shutil.which('nm')
    if objdump is None or nm is None or not sys.platform.startswith('linux'):
        pytest.skip('needs GNU objdump and nm')
    import mmdet_detrx
    (library, ) = [osp.join(osp.dirname(mmdet_detrx.__file__), f)
                   for f in os.listdir(osp.dirname(mmdet_detrx.__file__))
                   if f.startswith('_C.') and f.endswith('.so')]
    listing = subprocess.run([objdump, '-d', '-C', '--no-show-raw-insn', library],
                             stdout=subprocess.PIPE, text=True, check=True).stdout
    symbols = subprocess.run([nm, '--defined-only', library], stdout=subprocess.PIPE,
                             text=True, check=True).stdout
    local_text = {int(fields[0], 16) for fields in map(str.split, symbols.splitlines())
                  if len(fields) == 3 and fields[1] == 't'}
    function, local, offenders, per_isa = None, False, set(), 0
    for line in listing.splitlines():
        header = re.match(r'^([0-9a-f]+) <(.*)>:$', line)
        if header:
            function, local = header.group(2), int(header.group(1), 16) in local_text
            continue
        parts = line.split('\t')
        if function is None or len(parts) < 2:
            continue
        mnemonic = parts[1].split()[0] if parts[1].split() else ''
        if mnemonic.startswith('v') and mnemonic not in ('verr', 'verw'):
            if re.search(r'detrx::cpu::(AVX2|AVX512)::', function):
                per_isa += 1
            elif not local:
                offenders.add(function)
    assert not offenders, sorted(offenders)[:20]
    if any(level != 'default' for level in SUPPORTED):
        assert per_isa > 0  # the per-ISA kernels are there
