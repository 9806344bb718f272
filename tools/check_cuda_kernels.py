"""Compile-check the CUDA kernels of mmdet-detrx with nvcc, without a GPU.

Two stages, each ``nvcc -c`` into a temporary directory (nothing is linked or run):

1. ``kernels``: ``ops/cuda/check/ms_deform_attn_check.cu``, a torch-free translation unit that
   explicitly instantiates every multi-scale deformable attention kernel (forward and backward,
   channel vector widths 1/2/4) and launcher for float, double, __half and __nv_bfloat16, built
   with torch's nvcc flags (``__CUDA_NO_HALF_CONVERSIONS__`` etc.) for every target architecture,
   warnings as errors. Registers and spills per kernel are printed with ``--verbose``.
2. ``glue``: ``ops/cuda/ms_deform_attn_kernel.cu`` (the ``TORCH_LIBRARY_IMPL(detrx, CUDA, m)``
   registration) against the installed torch's headers, for the first architecture only. It only
   needs the c10/ATen CUDA headers, which the CPU wheels ship as well; skipped when they are absent
   (or with ``--no-glue``). This stage takes about a minute.

Targets: ``--arch``, else ``TORCH_CUDA_ARCH_LIST`` (e.g. ``"8.0;9.0"``), else sm_80 and sm_90.
Exit status 0 when everything compiled or nvcc is absent (a skip message is printed), 1 when a
compilation failed.

Example::

    python tools/check_cuda_kernels.py                      # sm_80 + sm_90, both stages
    TORCH_CUDA_ARCH_LIST="8.6;8.9" python tools/check_cuda_kernels.py --no-glue -v
"""
import argparse
import os
import os.path as osp
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
OPS_DIR = osp.join(ROOT, 'ops')
KERNEL_TU = osp.join(OPS_DIR, 'cuda', 'check', 'ms_deform_attn_check.cu')
GLUE_TU = osp.join(OPS_DIR, 'cuda', 'ms_deform_attn_kernel.cu')
DEFAULT_ARCHS = ('sm_80', 'sm_90')

# The flags torch.utils.cpp_extension gives nvcc: the kernels must compile without the implicit
# __half / __nv_bfloat16 conversions they disable.
TORCH_NVCC_FLAGS = [
    '-D__CUDA_NO_HALF_OPERATORS__', '-D__CUDA_NO_HALF_CONVERSIONS__',
    '-D__CUDA_NO_BFLOAT16_CONVERSIONS__', '-D__CUDA_NO_HALF2_OPERATORS__',
    '--expt-relaxed-constexpr'
]


def parse_arch_list(arch_list):
    """``"8.0;9.0+PTX 9.0a"`` -> ``['sm_80', 'sm_90', 'sm_90a']`` (TORCH_CUDA_ARCH_LIST syntax)."""
    archs = []
    for token in re.split(r'[;\s,]+', arch_list.strip()):
        if not token:
            continue
        match = re.fullmatch(r'(\d+)\.(\d+)([a-z]?)(\+PTX)?', token)
        if match is None:
            raise ValueError(f'TORCH_CUDA_ARCH_LIST: cannot parse {token!r}; expected entries '
                             'like "8.0", "9.0a" or "8.6+PTX"')
        arch = f'sm_{match.group(1)}{match.group(2)}{match.group(3)}'
        if arch not in archs:
            archs.append(arch)
    if not archs:
        raise ValueError(f'TORCH_CUDA_ARCH_LIST: no architecture in {arch_list!r}')
    return archs


def find_nvcc(explicit=None):
    if explicit:
        return explicit if osp.isfile(explicit) else None
    nvcc = shutil.which('nvcc')
    if nvcc is None:
        cuda_home = os.environ.get('CUDA_HOME') or os.environ.get('CUDA_PATH')
        candidate = osp.join(cuda_home, 'bin', 'nvcc') if cuda_home else None
        if candidate and osp.isfile(candidate):
            nvcc = candidate
    return nvcc


def torch_include_dirs():
    """Include dirs of the installed torch if it ships its c10/ATen CUDA headers, else None."""
    try:
        from torch.utils.cpp_extension import include_paths
    except ImportError:
        return None
    dirs = include_paths()
    if not any(osp.isfile(osp.join(d, 'c10', 'cuda', 'CUDAGuard.h')) for d in dirs):
        return None
    return dirs


MANGLED_TYPES = {'f': 'float', 'd': 'double', '6__half': '__half',
                 '13__nv_bfloat16': '__nv_bfloat16'}


def summarize_ptxas(log):
    """``ptxas -v`` output -> one line per (kernel, arch) with registers and spills."""
    lines, name, arch, spill = [], None, None, ''
    for line in log.splitlines():
        entry = re.search(r"Compiling entry function '(\S+)' for '(\S+)'", line)
        if entry:
            name, arch = entry.group(1), entry.group(2)
            spill = ''
            continue
        spills = re.search(r'(\d+) bytes spill stores, (\d+) bytes spill loads', line)
        if spills:
            spill = f'spill stores {spills.group(1)} B, loads {spills.group(2)} B'
        used = re.search(r'Used (\d+) registers', line)
        if used and name:
            kernel = re.search(r'(ms_deform_attn_\w+?_kernel)I(\w+?)Li(\d)E', name)
            label = (f'{kernel.group(1)}<{MANGLED_TYPES.get(kernel.group(2), kernel.group(2))}, '
                     f'VEC={kernel.group(3)}>' if kernel else name)
            lines.append(f'    {arch:7s} {label:60s} {used.group(1):>3s} regs  {spill}')
            name = None
    return lines


def run_nvcc(cmd, verbose):
    start = time.time()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    elapsed = time.time() - start
    if verbose:
        print('  $ ' + ' '.join(cmd))
    return proc.returncode, proc.stdout, elapsed


def check_kernels(nvcc, archs, out_dir, verbose):
    ok = True
    for arch in archs:
        cmd = [
            nvcc, '-std=c++17', '-O3', f'-arch={arch}', '-I', OPS_DIR, *TORCH_NVCC_FLAGS,
            '-Werror', 'all-warnings', '-Xptxas', '-v', '-c', KERNEL_TU, '-o',
            osp.join(out_dir, f'ms_deform_attn_check_{arch}.o')
        ]
        rc, log, elapsed = run_nvcc(cmd, verbose)
        status = 'ok' if rc == 0 else 'FAILED'
        print(f'[kernels] {arch}: {status} ({elapsed:.1f} s)')
        if rc != 0:
            ok = False
            print(log)
        elif verbose:
            print('\n'.join(summarize_ptxas(log)))
    return ok


def check_glue(nvcc, arch, include_dirs, out_dir, verbose):
    cmd = [
        nvcc, '-std=c++17', '-O3', f'-arch={arch}', '-I', OPS_DIR,
        *[flag for d in include_dirs for flag in ('-I', d)], *TORCH_NVCC_FLAGS,
        # The CPU wheels lack the generated c10/cuda/impl/cuda_cmake_macros.h; it only sets
        # export macros, which do not matter for a compile check.
        '-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE', '-DWITH_CUDA', '-Xcompiler', '-fPIC', '-c', GLUE_TU,
        '-o', osp.join(out_dir, 'ms_deform_attn_kernel.o')
    ]
    rc, log, elapsed = run_nvcc(cmd, verbose)
    print(f'[glue]    {arch}: {"ok" if rc == 0 else "FAILED"} ({elapsed:.1f} s)')
    if rc != 0 or verbose:
        print(log)
    return rc == 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--arch', nargs='+', help='targets such as sm_80 sm_90 (default: '
                        'TORCH_CUDA_ARCH_LIST, else sm_80 sm_90)')
    parser.add_argument('--nvcc', help='nvcc executable (default: PATH, then $CUDA_HOME/bin)')
    parser.add_argument('--no-glue', action='store_true',
                        help='skip compiling the torch glue ms_deform_attn_kernel.cu')
    parser.add_argument('-v', '--verbose', action='store_true',
                        help='print commands, compiler output and registers/spills per kernel')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    nvcc = find_nvcc(args.nvcc)
    if nvcc is None:
        print('check_cuda_kernels: nvcc not found (PATH, CUDA_HOME); skipping the CUDA '
              'compile check.')
        return 0
    if args.arch:
        archs = list(args.arch)
    elif os.environ.get('TORCH_CUDA_ARCH_LIST'):
        try:
            archs = parse_arch_list(os.environ['TORCH_CUDA_ARCH_LIST'])
        except ValueError as error:
            print(f'check_cuda_kernels: {error}')
            return 1
    else:
        archs = list(DEFAULT_ARCHS)
    version = subprocess.run([nvcc, '--version'], stdout=subprocess.PIPE, text=True).stdout
    release = re.search(r'release [\d.]+, V[\d.]+', version)
    print(f'check_cuda_kernels: {nvcc} ({release.group(0) if release else "unknown version"}), '
          f'targets {" ".join(archs)}')

    with tempfile.TemporaryDirectory(prefix='detrx_cuda_check_') as out_dir:
        ok = check_kernels(nvcc, archs, out_dir, args.verbose)
        if args.no_glue:
            print('[glue]    skipped (--no-glue)')
        else:
            include_dirs = torch_include_dirs()
            if include_dirs is None:
                print('[glue]    skipped: torch or its c10/cuda headers are not installed')
            else:
                ok = check_glue(nvcc, archs[0], include_dirs, out_dir, args.verbose) and ok
    print('check_cuda_kernels: ' + ('all compiled' if ok else 'FAILED'))
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
