"""build_tools/cuda_link_check.py (``make cuda-link``): version parsing, the torch / nvcc CUDA-major
check and its message, nvcc discovery, the rebuild stamp. The real link check downloads a CUDA
torch and builds for minutes, so it is not run here (docs/cuda.md has its numbers)."""
import json
import os
import stat

import _helpers
import pytest

NVCC_13 = ('nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, '
           'V13.0.88\nBuild cuda_13.0.r13.0/compiler.36424714_0\n')


def load_tool():
    return _helpers.load_tool('build_tools/cuda_link_check.py')


def write_script(path, body):
    path.write_text('#!/bin/sh\n' + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_parse_nvcc_version():
    tool = load_tool()
    assert tool.parse_nvcc_version(NVCC_13) == (13, 0)
    assert tool.parse_nvcc_version('Cuda compilation tools, release 12.8, V12.8.93') == (12, 8)
    with pytest.raises(tool.CheckError, match='cannot read a CUDA version') as error:
        tool.parse_nvcc_version('command not found')
    assert error.value.status == 2


def test_matching_majors_pass():
    tool = load_tool()
    tool.check_cuda_majors('2.14.1+cu130', '13.0', (13, 0), '/usr/bin/nvcc', 'torch==2.14.1')
    tool.check_cuda_majors('2.9.1+cu128', '12.8', (12, 4), '/usr/bin/nvcc', 'torch==2.9.1')


def test_major_mismatch_names_both_versions_and_the_fix():
    tool = load_tool()
    with pytest.raises(tool.CheckError) as error:
        tool.check_cuda_majors('2.9.1+cu128', '12.8', (13, 0), '/opt/cuda/bin/nvcc',
                               'torch==2.9.1')
    message = str(error.value)
    assert error.value.status == 2
    assert 'torch 2.9.1+cu128' in message and 'CUDA 12.8' in message
    assert '/opt/cuda/bin/nvcc' in message and 'CUDA 13.0' in message
    # what to install, both ways round
    assert 'torch==2.14.1' in message and 'cu130' in message
    assert 'nvidia-cuda-nvcc-cu12' in message
    with pytest.raises(tool.CheckError, match='nvidia-cuda-nvcc==13'):
        tool.check_cuda_majors('2.14.1', '13.0', (12, 8), 'nvcc', 'torch==2.14.1')


def test_cpu_only_torch_is_refused():
    tool = load_tool()
    with pytest.raises(tool.CheckError, match='CPU-only build') as error:
        tool.check_cuda_majors('2.13.0+cpu', None, (13, 0), 'nvcc', 'torch==2.13.0')
    assert 'torch 2.13.0+cpu' in str(error.value) and 'torch==2.14.1' in str(error.value)


def torch_report(version, requires=()):
    return {'install': [{'metadata': {'name': 'torch', 'version': version,
                                      'requires_dist': list(requires)}}]}


def test_torch_cuda_predicted_from_the_resolved_wheel():
    """The CUDA major of a spec is known before the multi-GB install: local version label
    (download.pytorch.org wheels) or the CUDA packages a PyPI wheel requires."""
    predict = load_tool().predicted_torch_cuda
    assert predict(torch_report('2.5.1+cu121')) == ('2.5.1+cu121', '12.x')
    assert predict(torch_report('2.7.0+cu118')) == ('2.7.0+cu118', '11.x')
    assert predict(torch_report('2.13.0+cpu')) == ('2.13.0+cpu', None)
    assert predict(torch_report('2.14.1', [
        'filelock', 'cuda-toolkit[cublas,cudart]==13.0.3; platform_system == "Linux"',
        'nvidia-cudnn-cu13==9.24.0.43; platform_system == "Linux"'])) == ('2.14.1', '13.x')
    assert predict(torch_report('2.9.1', [
        'nvidia-cuda-runtime-cu12==12.8.90; platform_system == "Linux"'])) == ('2.9.1', '12.x')
    assert predict(torch_report('2.4.1', ['filelock', 'sympy'])) == ('2.4.1', None)  # macOS-like
    assert predict({'install': []}) == (None, 'unknown')


def test_find_nvcc(tmp_path):
    tool = load_tool()
    with pytest.raises(tool.CheckError, match='--nvcc'):
        tool.find_nvcc(str(tmp_path / 'missing'))
    home = tmp_path / 'cuda'
    (home / 'bin').mkdir(parents=True)
    nvcc = write_script(home / 'bin' / 'nvcc', 'echo\n')
    assert tool.find_nvcc(environ={'CUDA_HOME': str(home)}) == nvcc
    assert tool.find_nvcc(nvcc) == nvcc


def test_cuda_home_follows_wrapper_scripts(tmp_path):
    """/usr/local/bin/nvcc is often `exec /usr/local/cuda-X/bin/nvcc "$@"`: CUDA_HOME must be the
    toolkit, not /usr/local."""
    tool = load_tool()
    toolkit = tmp_path / 'cuda-13.0'
    (toolkit / 'bin').mkdir(parents=True)
    write_script(toolkit / 'bin' / 'nvcc', 'echo\n')
    wrapper = write_script(tmp_path / 'nvcc', f'exec {toolkit}/bin/nvcc "$@"\n')
    assert tool.cuda_home_of(wrapper) == str(toolkit)
    assert tool.cuda_home_of(str(toolkit / 'bin' / 'nvcc')) == str(toolkit)


def test_rebuild_stamp_tracks_arch_and_torch():
    tool = load_tool()
    base = tool.source_digest('8.0', '2.14.1+cu130', (13, 0))
    assert base == tool.source_digest('8.0', '2.14.1+cu130', (13, 0))
    assert base != tool.source_digest('9.0', '2.14.1+cu130', (13, 0))
    assert base != tool.source_digest('8.0', '2.11.0+cu130', (13, 0))


def test_wheel_bytes_from_pip_report(tmp_path):
    tool = load_tool()
    wheel = tmp_path / 'a-1.0-py3-none-any.whl'
    wheel.write_bytes(b'x' * 1234)
    report = tmp_path / 'report.json'
    report.write_text(json.dumps({'install': [
        {'download_info': {'url': wheel.as_uri()}, 'metadata': {'name': 'a'}},
        {'download_info': {'url': 'https://example.invalid/b.whl'}, 'metadata': {'name': 'b'}},
    ]}))
    assert tool.wheel_bytes(str(report)) == (1234, 2, ['b'])


def test_mismatch_end_to_end_exits_2_before_building(tmp_path, capsys):
    """A venv whose torch reports CUDA 13.0 and an nvcc of CUDA 12.8: exit 2 with the message,
    nothing installed or built."""
    tool = load_tool()
    venv = tmp_path / 'venv'
    (venv / 'bin').mkdir(parents=True)
    info = json.dumps({'version': '2.14.1+cu130', 'cuda': '13.0', 'cuda_available': False})
    write_script(venv / 'bin' / 'python', f"echo '{info}'\n")
    (venv / '.cuda-link-installed').write_text(
        '\n'.join(['torch==2.14.1'] + tool.EXTRA_PACKAGES) + '\n')
    nvcc = write_script(tmp_path / 'nvcc',
                        'echo "Cuda compilation tools, release 12.8, V12.8.93"\n')
    build_dir = tmp_path / 'build'
    status = tool.main(['--venv', str(venv), '--nvcc', nvcc, '--torch-spec', 'torch==2.14.1',
                        '--build-dir', str(build_dir)])
    out = capsys.readouterr().out
    assert status == 2
    assert 'CUDA major version mismatch' in out
    assert 'CUDA 13.0' in out and 'CUDA 12.8' in out
    assert not build_dir.exists()
    assert sorted(os.listdir(venv)) == ['.cuda-link-installed', 'bin']
