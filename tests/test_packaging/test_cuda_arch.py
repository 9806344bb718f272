"""CUDA architectures the extension is built for (build_tools/cuda_arch.py, used by setup.py):
TORCH_CUDA_ARCH_LIST is honoured, the visible GPUs are torch's choice, a cross-build gets the
documented sm_70..sm_90 + PTX list (minus what the local nvcc dropped), and a list that cannot be
built is an error saying what to do."""
import os
import os.path as osp
import shutil
import subprocess
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, osp.join(ROOT, 'build_tools'))
import cuda_arch  # noqa: E402

CUDA_13 = ['75', '80', '86', '87', '88', '89', '90', '100', '110', '103', '120', '121']
CUDA_12 = ['50', '52', '53', '60', '61', '62', '70', '72', '75', '80', '86', '87', '89', '90']


def quiet(_message):
    pass


def test_user_list_is_honoured_verbatim():
    assert cuda_arch.resolve_arch_list('8.6', gpu_visible=True, supported=CUDA_13,
                                       log=quiet) == '8.6'
    assert cuda_arch.resolve_arch_list('8.0;9.0a+PTX', gpu_visible=False, supported=CUDA_13,
                                       log=quiet) == '8.0;9.0a+PTX'
    assert cuda_arch.resolve_arch_list('Ampere Hopper', gpu_visible=False, supported=CUDA_13,
                                       log=quiet) == 'Ampere Hopper'


def test_visible_gpu_is_left_to_torch():
    assert cuda_arch.resolve_arch_list(None, gpu_visible=True, supported=CUDA_13) is None
    assert cuda_arch.resolve_arch_list('', gpu_visible=True, supported=CUDA_13) is None
    assert cuda_arch.resolve_arch_list('native', gpu_visible=True, supported=CUDA_13) == 'native'


def test_cross_build_default_covers_volta_to_hopper_with_ptx():
    assert cuda_arch.DEFAULT_CROSS_ARCH_LIST == '7.0;7.5;8.0;8.6;8.9;9.0+PTX'
    messages = []
    assert cuda_arch.resolve_arch_list(None, gpu_visible=False, supported=CUDA_12,
                                       log=messages.append) == cuda_arch.DEFAULT_CROSS_ARCH_LIST
    assert 'cross-building' in messages[-1]


def test_cross_build_drops_what_nvcc_no_longer_supports():
    messages = []
    value = cuda_arch.resolve_arch_list(None, gpu_visible=False, supported=CUDA_13,
                                        log=messages.append)
    assert value == '7.5;8.0;8.6;8.9;9.0+PTX'  # CUDA 13 removed sm_70
    assert any('sm_70' in m for m in messages)


def test_cross_build_keeps_ptx_on_the_newest_kept():
    value = cuda_arch.resolve_arch_list(None, gpu_visible=False, supported=['70', '75', '80'],
                                        log=quiet)
    assert value == '7.0;7.5;8.0+PTX'


def test_unsupported_user_arch_is_a_clear_error():
    with pytest.raises(cuda_arch.CudaArchError, match=r'cannot compile for 7\.0.*supports 7\.5'):
        cuda_arch.resolve_arch_list('7.0;8.0', gpu_visible=False, supported=CUDA_13)


@pytest.mark.parametrize('bad', ['sm_80', '8', 'Hoppper', '8.0;;x'])
def test_unparsable_list_names_the_entry(bad):
    with pytest.raises(cuda_arch.CudaArchError, match='cannot parse'):
        cuda_arch.resolve_arch_list(bad, gpu_visible=False, supported=None)


def test_native_without_gpu_is_an_error():
    with pytest.raises(cuda_arch.CudaArchError, match='native needs a visible GPU'):
        cuda_arch.resolve_arch_list('native', gpu_visible=False, supported=CUDA_13)


def test_named_lists_expand_for_validation():
    assert cuda_arch.parse_arch_list('Ampere;9.0') == ['8.0', '8.6+PTX', '9.0']
    with pytest.raises(cuda_arch.CudaArchError, match='cannot compile for 7.0'):
        cuda_arch.resolve_arch_list('Volta', gpu_visible=False, supported=CUDA_13)


@pytest.mark.skipif(shutil.which('nvcc') is None, reason='nvcc not installed')
def test_local_nvcc_is_queried_and_the_cli_prints_a_buildable_list():
    supported = cuda_arch.nvcc_supported_archs()
    assert supported and all(s[:2].isdigit() for s in supported)
    proc = subprocess.run([sys.executable, osp.join(ROOT, 'build_tools', 'cuda_arch.py')],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    entries = proc.stdout.strip().split(';')
    assert entries[-1].endswith('+PTX') and '9.0+PTX' in entries
    assert all(e.replace('+PTX', '').replace('.', '') in supported for e in entries)


def test_setup_refuses_force_cuda_with_a_cpu_torch(tmp_path):
    torch = pytest.importorskip('torch')
    if torch.version.cuda is not None:
        pytest.skip('this torch is a CUDA build')
    env = dict(os.environ, FORCE_CUDA='1')
    env.pop('MMDET_DETRX_NO_EXT', None)
    proc = subprocess.run([sys.executable, osp.join(ROOT, 'setup.py'), '--name'], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert 'FORCE_CUDA=1 needs a CUDA build of torch' in proc.stderr
