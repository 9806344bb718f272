"""build_tools/check_cuda_kernels.py without a GPU: the CUDA kernels of the ops compile with nvcc for
sm_80 / sm_90, the checker fails on broken device code, and the unmodified kernels, run in the
CPU emulator (ops/cuda/check/ms_deform_attn_emulate.cpp), match the grid_sample reference."""
import os.path as osp
import shutil
import subprocess
import sys

import _helpers
import pytest

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOOL = osp.join(ROOT, 'build_tools', 'check_cuda_kernels.py')

needs_nvcc = pytest.mark.skipif(shutil.which('nvcc') is None, reason='nvcc not installed')


def load_tool():
    return _helpers.load_tool('build_tools/check_cuda_kernels.py')


def test_parse_arch_list():
    tool = load_tool()
    assert tool.parse_arch_list('8.0;9.0') == ['sm_80', 'sm_90']
    assert tool.parse_arch_list('8.6 8.9+PTX, 9.0a;8.6') == ['sm_86', 'sm_89', 'sm_90a']
    with pytest.raises(ValueError, match='Hopper'):
        tool.parse_arch_list('Hopper')
    with pytest.raises(ValueError, match='no architecture'):
        tool.parse_arch_list(' ; ')


@needs_nvcc
def test_kernels_compile_for_sm80_and_sm90():
    proc = subprocess.run([sys.executable, TOOL, '--no-glue', '--no-emulate', '--arch', 'sm_80',
                           'sm_90'],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout
    assert '[kernels] sm_80: ok' in proc.stdout
    assert '[kernels] sm_90: ok' in proc.stdout


@needs_nvcc
def test_checker_fails_on_broken_device_code(tmp_path, monkeypatch, capsys):
    broken = tmp_path / 'broken.cu'
    broken.write_text('#include "cuda/ms_deform_attn_kernel.cuh"\n'
                      '__global__ void k(float* p) { p[0] = undeclared_symbol; }\n')
    tool = load_tool()
    monkeypatch.setattr(tool, 'KERNEL_TU', str(broken))
    assert not tool.check_kernels(shutil.which('nvcc'), ['sm_80'], str(tmp_path), verbose=False)
    assert 'undeclared_symbol' in capsys.readouterr().out


def test_skips_cleanly_without_nvcc(monkeypatch, capsys):
    tool = load_tool()
    monkeypatch.setattr(tool, 'find_nvcc', lambda explicit=None: None)
    assert tool.main([]) == 0
    assert 'nvcc not found' in capsys.readouterr().out


@pytest.mark.slow
@needs_nvcc
def test_torch_glue_compiles():
    tool = load_tool()
    if tool.torch_include_dirs() is None:
        pytest.skip("torch's c10/cuda headers are not installed")
    proc = subprocess.run([sys.executable, TOOL, '--no-emulate', '--arch', 'sm_80'],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout
    assert '[glue]    sm_80: ok' in proc.stdout


# --- the kernels themselves, run on the CPU by the emulator ------------------------------------


@pytest.fixture(scope='module')
def emulator(tmp_path_factory):
    if shutil.which('nvcc') is None:
        pytest.skip('nvcc not installed')
    pytest.importorskip('numpy')
    tool = load_tool()
    return tool, tool.build_emulator(shutil.which('nvcc'), str(tmp_path_factory.mktemp('emu')))


def run_emulation(emulator, tmp_path, dtype, problem_kwargs=None, **emulate_kwargs):
    tool, binary = emulator
    problem = tool.round_problem(dtype, *tool.emulation_problem(**(problem_kwargs or {})))
    actual = tool.emulate(binary, str(tmp_path), dtype, *problem, **emulate_kwargs)
    return actual, tool.reference_outputs(*problem)


# Channel counts cover every vector width (4, 2, 1) and group size (1 .. 32 lanes) and the
# multi-stride channel loop (71 = 3 strides of 32 lanes).
@pytest.mark.parametrize('dtype,channels', [
    ('double', 2), ('double', 71), ('float', 1), ('float', 4), ('float', 32), ('float', 30),
    ('float', 71), ('half', 32), ('half', 30), ('half', 71), ('bfloat16', 4), ('bfloat16', 30),
    # mixed precision: value in the first dtype, locations / weights in the second
    ('bfloat16:float', 32), ('bfloat16:float', 71), ('half:float', 30), ('half:double', 4),
    ('bfloat16:double', 8), ('float:double', 30)
])
def test_emulated_kernels_match_reference(emulator, tmp_path, dtype, channels):
    actual, expected = run_emulation(emulator, tmp_path, dtype, dict(channels=channels))
    assert emulator[0].emulation_error(actual, expected, dtype) <= 1


def test_emulated_many_channels_per_lane(emulator, tmp_path):
    actual, expected = run_emulation(
        emulator, tmp_path, 'float', dict(batch=1, heads=1, channels=1025, queries=4))
    assert emulator[0].emulation_error(actual, expected, 'float') <= 1


def test_emulated_grid_stride_loop_and_odd_batch(emulator, tmp_path):
    # 3 * 40 * 4 = 480 (batch, query, head) groups of 32 lanes on a 32-block grid (num_sms=1):
    # the grid-stride loop makes two rounds, the last one partial.
    actual, expected = run_emulation(
        emulator, tmp_path, 'float', dict(batch=3, heads=4, channels=40, queries=40), num_sms=1)
    assert emulator[0].emulation_error(actual, expected, 'float') <= 1


@pytest.mark.parametrize('dtype', ['float', 'half'])
def test_emulated_misaligned_value_falls_back_to_scalar_loads(emulator, tmp_path, dtype):
    actual, expected = run_emulation(emulator, tmp_path, dtype, dict(channels=8), value_offset=1)
    assert emulator[0].emulation_error(actual, expected, dtype) <= 1


@pytest.mark.parametrize('dtype', ['bfloat16:float', 'half:float'])
def test_emulated_mixed_precision_keeps_wide_gradients(emulator, tmp_path, dtype):
    """Location / weight gradients of mixed precision carry the coordinates' (fp32) precision:
    far tighter than a bfloat16 / float16 result could be."""
    tool, _ = emulator
    actual, expected = run_emulation(emulator, tmp_path, dtype, dict(channels=32))
    for a, e in zip(actual[2:], expected[2:]):
        assert abs(a - e).max() <= 1e-5 * abs(e).max()


@pytest.mark.parametrize('table', ['sum_overflows', 'wrong_start', 'too_few_tokens'])
def test_emulated_kernels_trap_on_an_inconsistent_level_table(emulator, tmp_path, table):
    """The device-side guard: a level table that does not describe value (which the host check
    rejects, but which a write behind its back could produce) traps before any read."""
    tool, binary = emulator
    value, shapes, starts, locations, weights, grad_output = tool.emulation_problem(
        shapes=((7, 8), (3, 4)))
    if table == 'sum_overflows':  # 2^32 * 2^32 wraps to 0 in int64
        shapes[0] = (2**32, 2**32)
        starts[1] = 0
    elif table == 'wrong_start':
        starts[1] = -2**62
    else:
        value = value[:, :-1]
    with pytest.raises(RuntimeError, match='kernel trapped'):
        tool.emulate(binary, str(tmp_path), 'float', value, shapes, starts, locations, weights,
                     grad_output)


def test_emulated_points_off_the_maps_contribute_nothing(emulator, tmp_path):
    tool, binary = emulator
    for result in tool.emulate(binary, str(tmp_path), 'float', *tool.off_map_problem()):
        assert not result.any()


@pytest.mark.slow
@needs_nvcc
def test_emulation_under_address_sanitizer():
    proc = subprocess.run([sys.executable, TOOL, '--no-glue', '--sanitize', '--arch', 'sm_80'],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout
    assert 'under ASan + UBSan' in proc.stdout


@pytest.mark.slow
@needs_nvcc
def test_level_guard_runs_before_any_out_of_bounds_read(tmp_path):
    """Under AddressSanitizer: a value tensor shorter than the level table promises (which the
    op's input check rejects) makes the kernels trap on their level-table guard, and ASan sees no
    read out of bounds before it (it would abort first, with its own report)."""
    pytest.importorskip('numpy')
    tool = load_tool()
    binary = tool.build_emulator(shutil.which('nvcc'), str(tmp_path), sanitize=True)
    value, shapes, starts, locations, weights, grad_output = tool.emulation_problem(
        shapes=((13, 17), ))
    locations[...] = 0.999  # the bottom-right pixel: the last tokens of each batch element
    with pytest.raises(RuntimeError, match='kernel trapped') as error:
        tool.emulate(binary, str(tmp_path / 'run'), 'float', value[:, :-3], shapes, starts,
                     locations, weights, grad_output)
    assert 'AddressSanitizer' not in str(error.value)
