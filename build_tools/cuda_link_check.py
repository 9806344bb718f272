"""Link and load the full extension against a CUDA build of torch, without a GPU (``make cuda-link``).

The CPU wheel of torch has no ``libtorch_cuda`` / ``libc10_cuda``, so the CUDA half of
``mmdet_detrx._C`` (``ops/cuda/*.cu``) cannot be linked or loaded in the main ``.venv``. This tool:

1. finds nvcc (``--nvcc``, else ``$CUDA_HOME/bin/nvcc``, else ``nvcc`` on the PATH) and reads its
   CUDA version;
2. creates a separate venv (``--venv``, default ``.venv-cuda``) and installs a CUDA build of torch
   (``--torch-spec``, default ``torch==2.14.1``: PyPI's Linux wheel of torch 2.14.1 is built with
   CUDA 13.0) plus ninja and the op tests' packages (no mmcv / mmdet), once: a stamp file records
   the spec, and pip's cache keeps downloaded wheels;
3. refuses, with a message naming both versions and what to install, when torch's CUDA major
   differs from nvcc's (the extension would not link, or not load): before the install, from
   the metadata of the wheel pip resolves the spec to (no download where the index serves
   wheel metadata), and again after it, from the installed torch;
4. builds the extension with ``FORCE_CUDA=1`` into ``build/cuda-link`` (never in place: the
   ``mmdet_detrx/_C*.so`` of the main venv stays untouched) for ``--arch`` (default ``8.0``, one
   architecture to keep the check quick; ``--arch default`` uses setup.py's cross-build list).
   The ninja build directory persists and a stamp over the sources, setup.py, arch list and
   torch version skips an unchanged rebuild;
5. stages the package with the new ``_C`` in ``build/cuda-link/stage``, imports it (extension
   modules load with ``RTLD_NOW``, so an unresolved symbol fails here), checks the shared
   object's DT_NEEDED entries include torch's CUDA libraries, and asserts that
   ``detrx::ms_deform_attn_forward`` / ``_backward`` have ``CUDA`` and ``CPU`` kernels in the
   dispatch table;
6. runs the op tests (``--tests``, default ``tests/test_ops``) in that venv against the staged
   package: the CPU tests must pass; the GPU tests skip (no device).

Timings of every stage and the wheel bytes of the install go to ``build/cuda-link/report.json``
(and stdout). Exit status 0 when every stage passed, 1 when one failed, 2 on a version mismatch
or a missing nvcc.

Example::

    python3 build_tools/cuda_link_check.py                  # what `make cuda-link` runs
    python3 build_tools/cuda_link_check.py --arch default   # setup.py's full arch list (slow)
    python3 build_tools/cuda_link_check.py --torch-spec "torch==2.9.1" --nvcc /usr/local/cuda-12.8/bin/nvcc
"""
import argparse
import glob
import hashlib
import json
import os
import os.path as osp
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEFAULT_TORCH_SPEC = 'torch==2.14.1'
# Packages the op tests and the build need besides torch (no mmcv / mmdet on purpose).
EXTRA_PACKAGES = ['ninja', 'setuptools>=77,<81', 'wheel', 'numpy', 'pytest', 'pytest-timeout',
                  'hypothesis']
OPS = ('detrx::ms_deform_attn_forward', 'detrx::ms_deform_attn_backward')
# The CUDA half of the extension links the CUDA runtime and torch's CUDA core (c10_cuda: streams,
# guards). libtorch_cuda.so is named on the link line too but dropped by --as-needed linkers when
# no symbol of it is used, so it is not required here.
CUDA_LIBS = ('libcudart.so', 'libc10_cuda.so')


class CheckError(Exception):
    """A stage failed; ``status`` is the exit status (1 failure, 2 setup / version mismatch)."""

    def __init__(self, message, status=1):
        super().__init__(message)
        self.status = status


def log(message):
    print(f'[cuda-link] {message}', flush=True)


def parse_nvcc_version(text):
    """``nvcc --version`` output -> ``(major, minor)``, e.g. ``'... release 13.0, V13.0.88'``."""
    match = re.search(r'release (\d+)\.(\d+)', text)
    if match is None:
        raise CheckError(f'cannot read a CUDA version from nvcc --version:\n{text.strip()}', 2)
    return int(match.group(1)), int(match.group(2))


def find_nvcc(explicit=None, environ=os.environ):
    """nvcc to build with: explicit path, else $CUDA_HOME/bin/nvcc, else nvcc on the PATH."""
    if explicit:
        if not (osp.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise CheckError(f'--nvcc {explicit}: not an executable file', 2)
        return explicit
    for home_var in ('CUDA_HOME', 'CUDA_PATH'):
        home = environ.get(home_var)
        if home and osp.isfile(osp.join(home, 'bin', 'nvcc')):
            return osp.join(home, 'bin', 'nvcc')
    nvcc = shutil.which('nvcc')
    if nvcc is None:
        raise CheckError('nvcc not found (set CUDA_HOME or --nvcc, or put nvcc on the PATH); '
                         'a CUDA toolkit is needed to build the CUDA kernels', 2)
    return nvcc


def cuda_home_of(nvcc):
    """The toolkit directory of an nvcc, following wrapper scripts like ``exec .../bin/nvcc``."""
    real = osp.realpath(nvcc)
    try:
        with open(real, 'rb') as f:
            head = f.read(4096)
        if head.startswith(b'#!'):
            match = re.search(rb'exec\s+"?(/\S+?/bin/nvcc)"?(\s|$)', head)
            if match:
                real = osp.realpath(match.group(1).decode())
    except OSError:
        pass
    return osp.dirname(osp.dirname(real))


def check_cuda_majors(torch_version, torch_cuda, nvcc_version, nvcc_path, torch_spec):
    """Raise a CheckError naming both versions and what to install unless the majors match."""
    nvcc_str = '{}.{}'.format(*nvcc_version)
    if torch_cuda is None:
        raise CheckError(
            f'torch {torch_version} (from {torch_spec!r}) is a CPU-only build: it has no '
            f'libtorch_cuda to link the CUDA kernels against. Install a CUDA '
            f'{nvcc_version[0]}.x build of torch, e.g. --torch-spec "{DEFAULT_TORCH_SPEC}" (PyPI\'s '
            f'default Linux wheel, CUDA 13.0) or one from '
            f'https://download.pytorch.org/whl/cu{nvcc_version[0]}{nvcc_version[1]}.', 2)
    torch_major = int(str(torch_cuda).split('.')[0])
    # The nvcc wheels are nvidia-cuda-nvcc-cu12 up to CUDA 12, nvidia-cuda-nvcc from CUDA 13.
    nvcc_wheel = (f'nvidia-cuda-nvcc=={torch_major}.*' if torch_major >= 13 else
                  f'nvidia-cuda-nvcc-cu{torch_major}')
    if torch_major != nvcc_version[0]:
        raise CheckError(
            f'CUDA major version mismatch: torch {torch_version} was built with CUDA {torch_cuda}, '
            f'but nvcc ({nvcc_path}) is CUDA {nvcc_str}. The extension must be compiled by a '
            f'toolkit of the same major version as torch. Either install a torch built with CUDA '
            f'{nvcc_version[0]}.x (--torch-spec, e.g. "{DEFAULT_TORCH_SPEC}" for CUDA 13.0, or '
            f'`pip install torch --index-url https://download.pytorch.org/whl/'
            f'cu{nvcc_version[0]}{nvcc_version[1]}`), or point CUDA_HOME / --nvcc at a CUDA '
            f'{torch_major}.x toolkit (e.g. `pip install "{nvcc_wheel}"`).', 2)


def run(cmd, stage, env=None, cwd=ROOT, nice=True, capture=False):
    """Run a command (niced on a shared machine); raise CheckError naming the stage on failure."""
    if nice and shutil.which('nice'):
        cmd = ['nice', '-n', '10'] + list(cmd)
    log(f'{stage}: $ {" ".join(cmd)}')
    proc = subprocess.run(cmd, env=env, cwd=cwd, text=True,
                          stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.STDOUT if capture else None)
    if proc.returncode != 0:
        if capture:
            print(proc.stdout, flush=True)
        raise CheckError(f'{stage} failed (exit status {proc.returncode}): {" ".join(cmd)}')
    return proc.stdout


def wheel_bytes(report_path):
    """Bytes of the archives pip installed (from ``pip install --report``). Archives from a local
    mirror (file://) are measured on disk; for remote ones pip's report has no size, so they are
    listed as unknown (the venv's size on disk is recorded as well)."""
    with open(report_path) as f:
        report = json.load(f)
    total, unknown = 0, []
    for item in report.get('install', []):
        url = item.get('download_info', {}).get('url', '')
        parsed = urllib.parse.urlparse(url)
        path = urllib.request.url2pathname(parsed.path) if parsed.scheme == 'file' else None
        if path and osp.isfile(path):
            total += osp.getsize(path)
        else:
            unknown.append(item.get('metadata', {}).get('name', url))
    return total, len(report.get('install', [])), unknown


def dir_bytes(path):
    total = 0
    for base, _, files in os.walk(path):
        for name in files:
            full = osp.join(base, name)
            if not osp.islink(full):
                total += osp.getsize(full)
    return total


def predicted_torch_cuda(report):
    """From a ``pip install --dry-run --report`` of the torch spec alone: ``(version, cuda)``
    where cuda is ``'13.x'``-like, None for a CPU build, or ``'unknown'``. Read from the local
    version label (``+cu130``, ``+cpu``: the download.pytorch.org wheels) or from the CUDA
    packages the wheel requires (PyPI's Linux wheels: ``cuda-toolkit==13.0.3``,
    ``nvidia-*-cu12``), so a mismatch is found before several GB are downloaded."""
    items = [i for i in report.get('install', [])
             if i.get('metadata', {}).get('name', '').lower() == 'torch']
    if not items:
        return None, 'unknown'
    metadata = items[0]['metadata']
    version = metadata.get('version', '?')
    label = re.search(r'\+(cu(\d+)|cpu|rocm[\d.]+)', version)
    if label:
        if label.group(2):
            return version, f'{label.group(2)[:-1]}.x'
        return version, None
    requires = [r for r in metadata.get('requires_dist', []) if 'extra ==' not in r]
    for pattern in (r'^cuda-toolkit\b.*?==\s*(\d+)\.', r'^nvidia-\S*?-cu(\d+)\b'):
        for requirement in requires:
            match = re.search(pattern, requirement)
            if match:
                return version, f'{match.group(1)}.x'
    if any(r.startswith(('nvidia-', 'cuda-')) for r in requires):
        return version, 'unknown'
    return version, None  # no CUDA libraries required: a CPU build


def precheck_torch_spec(venv_python, torch_spec, nvcc_version, nvcc_path, venv):
    """Refuse a torch spec whose CUDA major cannot match nvcc's before installing it."""
    report_path = osp.join(venv, 'cuda-link-precheck.json')
    proc = subprocess.run([venv_python, '-m', 'pip', 'install', '--dry-run', '--no-deps',
                           '--ignore-installed', '--quiet', '--report', report_path, torch_spec],
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not osp.isfile(report_path):
        log(f'install: could not resolve {torch_spec!r} ahead of the install; checking after it')
        return
    with open(report_path) as f:
        version, cuda = predicted_torch_cuda(json.load(f))
    if cuda == 'unknown':
        log(f'install: CUDA version of torch {version} not known ahead; checking after install')
        return
    log(f'install: {torch_spec!r} resolves to torch {version} '
        f'({"CUDA " + cuda if cuda else "CPU build"})')
    check_cuda_majors(version, cuda, nvcc_version, nvcc_path, torch_spec)


def install(venv, python, torch_spec, timings, info, nvcc_version=None, nvcc_path=None):
    """Create the venv and install torch + test packages once (stamp: the requested specs)."""
    venv_python = osp.join(venv, 'bin', 'python')
    wanted = '\n'.join([torch_spec] + EXTRA_PACKAGES) + '\n'
    stamp = osp.join(venv, '.cuda-link-installed')
    if osp.isfile(venv_python) and osp.isfile(stamp) and open(stamp).read() == wanted:
        log(f'install: {venv} already has {torch_spec} (stamp {stamp}); skipped')
        info['install'] = 'cached'
        return venv_python
    start = time.perf_counter()
    if not osp.isfile(venv_python):
        run([python, '-m', 'venv', venv], 'venv')
    if nvcc_version is not None:
        precheck_torch_spec(venv_python, torch_spec, nvcc_version, nvcc_path, venv)
    report = osp.join(venv, 'cuda-link-pip-report.json')
    # The torch spec is passed on every install so a later package cannot swap torch.
    run([venv_python, '-m', 'pip', 'install', '--progress-bar', 'off', '--report', report,
         torch_spec] + EXTRA_PACKAGES, 'install')
    timings['install_s'] = round(time.perf_counter() - start, 1)
    total, count, unknown = wheel_bytes(report)
    info['install'] = 'fresh'
    info['wheel_bytes'] = total
    info['wheels'] = count
    if unknown:
        info['wheel_bytes_unknown_for'] = unknown
    info['venv_bytes'] = dir_bytes(venv)
    with open(stamp, 'w') as f:
        f.write(wanted)
    return venv_python


def torch_info(venv_python):
    out = subprocess.run(
        [venv_python, '-c', 'import json, torch, torch.utils.cpp_extension as c; print(json.dumps('
         '{"version": torch.__version__, "cuda": torch.version.cuda, '
         '"cuda_available": torch.cuda.is_available()}))'],
        cwd='/', text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if out.returncode != 0:
        raise CheckError(f'torch does not import in the venv:\n{out.stdout}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def source_digest(arch, torch_version, nvcc_version):
    digest = hashlib.sha256()
    files = [osp.join(ROOT, 'setup.py')] + sorted(
        p for pattern in ('ops/*.h', 'ops/*.cpp', 'ops/*.def', 'ops/cpu/*.h', 'ops/cpu/*.cpp',
                          'ops/cpu/isa/*.cpp', 'ops/cuda/*.cu', 'ops/cuda/*.cuh')
        for p in glob.glob(osp.join(ROOT, pattern)))
    for path in files:
        digest.update(osp.relpath(path, ROOT).encode() + b'\0')
        with open(path, 'rb') as f:
            digest.update(f.read())
    digest.update(f'{arch}\0{torch_version}\0{nvcc_version}'.encode())
    return digest.hexdigest()


def build(venv_python, build_dir, arch, nvcc, max_jobs, tinfo, nvcc_version, timings, info):
    """Build mmdet_detrx._C with FORCE_CUDA=1 into build_dir/lib; return the .so path."""
    lib_dir = osp.join(build_dir, 'lib')
    stamp = osp.join(build_dir, '.build-stamp')
    digest = source_digest(arch, tinfo['version'], nvcc_version)
    built = glob.glob(osp.join(lib_dir, 'mmdet_detrx', '_C*.so'))
    if built and osp.isfile(stamp) and open(stamp).read() == digest:
        log(f'build: sources, arch list and torch unchanged (stamp {stamp}); skipped')
        info['build'] = 'cached'
        return built[0]
    for old in built:
        os.remove(old)
    env = dict(os.environ, FORCE_CUDA='1', MAX_JOBS=str(max_jobs), CUDA_HOME=cuda_home_of(nvcc))
    env.pop('MMDET_DETRX_NO_EXT', None)
    if arch == 'default':
        env.pop('TORCH_CUDA_ARCH_LIST', None)  # setup.py's default cross-build list
    else:
        env['TORCH_CUDA_ARCH_LIST'] = arch
    start = time.perf_counter()
    run([venv_python, 'setup.py', '-q', 'build_ext', '--build-lib', lib_dir, '--build-temp',
         osp.join(build_dir, 'temp')], 'build', env=env)
    timings['build_s'] = round(time.perf_counter() - start, 1)
    info['build'] = 'fresh'
    built = glob.glob(osp.join(lib_dir, 'mmdet_detrx', '_C*.so'))
    if len(built) != 1:
        raise CheckError(f'build: expected one mmdet_detrx/_C*.so under {lib_dir}, found {built}')
    with open(stamp, 'w') as f:
        f.write(digest)
    return built[0]


def stage(build_dir, so_path):
    """A copy of the package with the CUDA-linked _C, so neither tree's extension is replaced."""
    stage_dir = osp.join(build_dir, 'stage')
    package = osp.join(stage_dir, 'mmdet_detrx')
    if osp.isdir(package):
        shutil.rmtree(package)
    shutil.copytree(osp.join(ROOT, 'mmdet_detrx'), package,
                    ignore=shutil.ignore_patterns('*.so', '__pycache__', '*.pyc'))
    shutil.copy2(so_path, package)
    return stage_dir


def needed_libraries(so_path):
    """DT_NEEDED entries of a shared object (readelf), or None when readelf is absent."""
    readelf = shutil.which('readelf')
    if readelf is None:
        return None
    out = subprocess.run([readelf, '-d', so_path], text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT).stdout
    return re.findall(r'\(NEEDED\)\s+Shared library: \[([^\]]+)\]', out)


# Run in the CUDA venv with the staged package first on sys.path: imports the package (which
# loads _C with RTLD_NOW) and prints what the dispatcher has for each op.
LOAD_PROBE = r'''
import json, os, sys
stage = sys.argv[1]
sys.path.insert(0, stage)
import torch
import mmdet_detrx.ops as ops
from mmdet_detrx import _C
result = {"package": os.path.dirname(ops.__file__), "so": _C.__file__,
          "native_available": ops.native_available(), "kernels": {}}
for op in sys.argv[2:]:
    result["kernels"][op] = {key: torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
                             for key in ("CPU", "CUDA", "Meta", "Autograd")}
print(json.dumps(result))
'''


def check_load(venv_python, stage_dir, so_path, build_dir):
    needed = needed_libraries(so_path)
    if needed is not None:
        missing = [lib for lib in CUDA_LIBS if not any(n.startswith(lib) for n in needed)]
        log(f'load: {osp.basename(so_path)} needs {", ".join(needed)}')
        if missing:
            raise CheckError(f'load: {so_path} does not link {missing}: the CUDA sources were not '
                             'built into the extension (is FORCE_CUDA honoured by setup.py?)')
    proc = subprocess.run([venv_python, '-c', LOAD_PROBE, stage_dir, *OPS], cwd=build_dir,
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise CheckError(f'load: importing the CUDA-linked extension failed:\n{proc.stdout}')
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if not osp.realpath(result['package']).startswith(osp.realpath(stage_dir)):
        raise CheckError(f'load: imported {result["package"]}, not the staged package')
    if not result['native_available']:
        raise CheckError('load: mmdet_detrx.ops.native_available() is False')
    for op in OPS:
        kernels = result['kernels'][op]
        log(f'load: {op}: ' + ', '.join(f'{k}={"yes" if v else "no"}' for k, v in kernels.items()))
        absent = [key for key in ('CPU', 'CUDA') if not kernels[key]]
        if absent:
            raise CheckError(f'load: {op} has no {"/".join(absent)} kernel in the dispatch table')
    return result


# pytest in the CUDA venv: the staged package is imported before pytest puts test directories
# on sys.path, so the tests use the CUDA-linked extension, never the main tree's CPU build.
PYTEST_RUNNER = r'''
import sys
stage = sys.argv[1]
sys.path.insert(0, stage)
import mmdet_detrx.ops
assert mmdet_detrx.ops.__file__.startswith(stage), mmdet_detrx.ops.__file__
import pytest
sys.exit(pytest.main(sys.argv[2:]))
'''


def run_tests(venv_python, stage_dir, build_dir, tests, timings):
    start = time.perf_counter()
    # PYTHONPATH too, so that tests which start worker processes import the staged package.
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '2'),
               PYTHONPATH=stage_dir)
    args = ['-q', '-rs', '-c', osp.join(ROOT, 'pytest.ini'), '--rootdir', ROOT]
    args += [osp.join(ROOT, t) for t in tests]
    run([venv_python, '-c', PYTEST_RUNNER, stage_dir] + args, 'tests', env=env, cwd=build_dir)
    timings['tests_s'] = round(time.perf_counter() - start, 1)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--venv', default=osp.join(ROOT, '.venv-cuda'))
    parser.add_argument('--python', default=os.environ.get('PYTHON', 'python3'),
                        help='interpreter that creates the venv (default: $PYTHON or python3)')
    parser.add_argument('--torch-spec', default=os.environ.get('CUDA_TORCH_SPEC',
                                                               DEFAULT_TORCH_SPEC))
    parser.add_argument('--nvcc', help='default: $CUDA_HOME/bin/nvcc, else nvcc on the PATH')
    parser.add_argument('--arch', default=os.environ.get('CUDA_LINK_ARCH', '8.0'),
                        help='TORCH_CUDA_ARCH_LIST for the build (default 8.0: one arch keeps '
                        'the check quick); "default" = setup.py\'s cross-build list')
    parser.add_argument('--max-jobs', type=int, default=int(os.environ.get('MAX_JOBS', '2')))
    parser.add_argument('--build-dir', default=osp.join(ROOT, 'build', 'cuda-link'))
    parser.add_argument('--tests', nargs='*', default=['tests/test_ops'],
                        help='test paths (relative to the repository) to run in the venv; '
                        'none to skip')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    timings, info = {}, {}
    start = time.perf_counter()
    try:
        nvcc = find_nvcc(args.nvcc)
        nvcc_out = subprocess.run([nvcc, '--version'], text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT).stdout
        nvcc_version = parse_nvcc_version(nvcc_out)
        log(f'nvcc: {nvcc} (CUDA {nvcc_version[0]}.{nvcc_version[1]})')
        venv_python = install(osp.abspath(args.venv), args.python, args.torch_spec, timings, info,
                              nvcc_version, nvcc)
        tinfo = torch_info(venv_python)
        log(f'torch: {tinfo["version"]} (CUDA {tinfo["cuda"]}; GPU visible: '
            f'{tinfo["cuda_available"]})')
        check_cuda_majors(tinfo['version'], tinfo['cuda'], nvcc_version, nvcc, args.torch_spec)
        build_dir = osp.abspath(args.build_dir)
        os.makedirs(build_dir, exist_ok=True)
        so_path = build(venv_python, build_dir, args.arch, nvcc, args.max_jobs, tinfo,
                        nvcc_version, timings, info)
        stage_dir = stage(build_dir, so_path)
        check_load(venv_python, stage_dir, so_path, build_dir)
        if args.tests:
            run_tests(venv_python, stage_dir, build_dir, args.tests, timings)
    except CheckError as error:
        log(f'FAILED: {error}')
        return error.status
    timings['total_s'] = round(time.perf_counter() - start, 1)
    report = dict(torch=tinfo, nvcc='{}.{}'.format(*nvcc_version), arch=args.arch,
                  timings=timings, **info)
    with open(osp.join(build_dir, 'report.json'), 'w') as f:
        json.dump(report, f, indent=2)
    log(f'ok: {json.dumps(report)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
