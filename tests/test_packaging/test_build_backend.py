"""The PEP 517 backend (build_tools/detrx_backend.py): an isolated build compiles against the
environment's own torch (never a downloaded one), and a build that finds no torch stops before
compiling anything with what to run."""
import os
import os.path as osp
import subprocess
import sys
import tomllib
import venv

import pytest

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
BACKEND_DIR = osp.join(ROOT, 'build_tools')

# What pip's isolated build environment does: the environment's site-packages leave sys.path
# and only the build requirements (here: this environment's setuptools) are importable.
ISOLATED = '''
import sys
sys.path = [p for p in sys.path if 'site-packages' not in p and 'dist-packages' not in p]
sys.path[:0] = [{build_reqs!r}, {backend!r}]
import importlib.util
assert importlib.util.find_spec('torch') is None, 'torch still visible'
import detrx_backend
'''


@pytest.fixture(scope='module')
def build_requirements(tmp_path_factory):
    """A folder with only setuptools (as pip installs build requirements into its own)."""
    import setuptools
    folder = tmp_path_factory.mktemp('build_reqs')
    site = osp.dirname(osp.dirname(setuptools.__file__))
    for name in ('setuptools', 'pkg_resources', '_distutils_hack'):
        if osp.exists(osp.join(site, name)):
            os.symlink(osp.join(site, name), folder / name)
    return str(folder)


def test_pyproject_does_not_require_torch():
    with open(osp.join(ROOT, 'pyproject.toml'), 'rb') as f:
        build_system = tomllib.load(f)['build-system']
    assert not any(r.split('>')[0].split('=')[0].strip() == 'torch'
                   for r in build_system['requires'])
    assert build_system['build-backend'] == 'detrx_backend'
    assert build_system['backend-path'] == ['build_tools']


def test_isolated_build_sees_the_environments_torch(build_requirements):
    code = ISOLATED.format(build_reqs=build_requirements, backend=BACKEND_DIR) + '''
detrx_backend._expose_environment_torch()
import torch
print(torch.__file__)
'''
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    import torch
    assert proc.stdout.strip() == torch.__file__
    assert "building against the environment's torch" in proc.stderr


def test_build_without_torch_says_what_to_run(build_requirements, tmp_path):
    """An environment without torch: the backend's first hook stops with instructions."""
    env_dir = tmp_path / 'no_torch'
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = str(env_dir / 'bin' / 'python')
    code = ISOLATED.format(build_reqs=build_requirements, backend=BACKEND_DIR) + '''
detrx_backend.get_requires_for_build_wheel()
'''
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'MMDET_DETRX_NO_EXT')}
    proc = subprocess.run([python, '-c', code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode != 0
    assert 'cannot import torch' in proc.stderr
    assert 'Install torch first' in proc.stderr
    assert 'pip install --no-build-isolation .' in proc.stderr
    assert 'MMDET_DETRX_NO_EXT=1 pip install .' in proc.stderr


@pytest.mark.slow
def test_pip_wheel_with_build_isolation(tmp_path):
    """The real thing: pip's isolated build (fetches setuptools, wheel, ninja from the index)."""
    import zipfile

    import torch
    proc = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', ROOT, '-w',
                           str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=1200, env=dict(os.environ, MAX_JOBS='2'))
    assert proc.returncode == 0, proc.stdout[-5000:]
    (wheel, ) = tmp_path.glob('mmdet_detrx-*.whl')
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(next(n for n in archive.namelist()
                                     if n.endswith('.dist-info/METADATA'))).decode()
        assert any(n.startswith('mmdet_detrx/_C.') for n in archive.namelist())
    major, minor = torch.__version__.split('+')[0].split('.')[:2]
    assert f'Requires-Dist: torch=={major}.{minor}.*' in metadata
