"""tools/check_cuda_kernels.py: the CUDA kernels of the ops compile with nvcc for sm_80 / sm_90
(no GPU needed), and the checker really fails on broken device code."""
import importlib.util
import os.path as osp
import shutil
import subprocess
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOOL = osp.join(ROOT, 'tools', 'check_cuda_kernels.py')

needs_nvcc = pytest.mark.skipif(shutil.which('nvcc') is None, reason='nvcc not installed')


def load_tool():
    spec = importlib.util.spec_from_file_location('check_cuda_kernels', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    proc = subprocess.run([sys.executable, TOOL, '--no-glue', '--arch', 'sm_80', 'sm_90'],
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
    proc = subprocess.run([sys.executable, TOOL, '--arch', 'sm_80'], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout
    assert '[glue]    sm_80: ok' in proc.stdout
