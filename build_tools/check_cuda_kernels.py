"""Compile-check (and CPU-emulate) the CUDA kernels of mmdet-detrx with nvcc, without a GPU.

Stages 1 and 2 are ``nvcc -c`` into a temporary directory (nothing is linked or run):

1. ``kernels``: ``ops/cuda/check/ms_deform_attn_check.cu``, a torch-free translation unit that
   explicitly instantiates every multi-scale deformable attention kernel (forward and backward,
   channel vector widths 1/2/4) and launcher for float, double, __half and __nv_bfloat16, built
   with torch's nvcc flags (``__CUDA_NO_HALF_CONVERSIONS__`` etc.) for every target architecture,
   warnings as errors. Registers and spills per kernel are printed with ``--verbose``.
2. ``glue``: ``ops/cuda/ms_deform_attn_kernel.cu`` (the ``TORCH_LIBRARY_IMPL(detrx, CUDA, m)``
   registration) against the installed torch's headers, for the first architecture only. It only
   needs the c10/ATen CUDA headers, which the CPU wheels ship as well; skipped when they are absent
   (or with ``--no-glue``). This stage takes about a minute.

3. ``emulate``: ``ops/cuda/check/ms_deform_attn_emulate.cpp`` runs the unmodified kernel bodies
   and launchers on CPU threads (shuffles, barriers and atomics emulated; see that file) for a
   few problems in every dtype, and compares output and gradients with the grid_sample reference
   ``mmdet_detrx.ops.ms_deform_attn_pytorch``. Needs torch and numpy; ``--no-emulate`` skips it.
   This checks the kernels' arithmetic and indexing without a GPU, not their behaviour on one.
   ``--sanitize`` builds the emulator with AddressSanitizer + UBSan: out-of-bounds indexing in
   the kernels then aborts the run.

Targets: ``--arch``, else ``TORCH_CUDA_ARCH_LIST`` (e.g. ``"8.0;9.0"``), else sm_80 and sm_90.
Exit status 0 when every stage passed or nvcc is absent (a skip message is printed), 1 when a
compilation failed.

Example::

    python build_tools/check_cuda_kernels.py                      # sm_80 + sm_90, all stages
    TORCH_CUDA_ARCH_LIST="8.6;8.9" python build_tools/check_cuda_kernels.py --no-glue -v
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
EMULATOR_SRC = osp.join(OPS_DIR, 'cuda', 'check', 'ms_deform_attn_emulate.cpp')
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


def build_emulator(nvcc, out_dir, verbose=False, sanitize=False):
    """Compiles ms_deform_attn_emulate.cpp (host code only) and returns the executable's path.
    With `sanitize`, under AddressSanitizer + UndefinedBehaviorSanitizer (gcc / clang): any
    out-of-bounds access or undefined behaviour of the kernels' indexing aborts the run."""
    binary = osp.join(out_dir, 'ms_deform_attn_emulate' + ('_asan' if sanitize else ''))
    cmd = [nvcc, '-std=c++17', '-O2', '-I', OPS_DIR, EMULATOR_SRC, '-o', binary]
    if sanitize:
        # One flag per -Xcompiler: nvcc splits its values at commas.
        cmd += ['-g', '-Xcompiler', '-fsanitize=address', '-Xcompiler', '-fsanitize=undefined',
                '-Xcompiler', '-fno-sanitize-recover=undefined', '-Xcompiler',
                '-fno-omit-frame-pointer', '-lasan', '-lubsan']
    rc, log, elapsed = run_nvcc(cmd, verbose)
    if rc != 0:
        raise RuntimeError(f'building the kernel emulator failed:\n{log}')
    return binary


# Names of the emulator's dtypes; numpy has no bfloat16, so inputs travel as float64 and the
# emulator rounds them (round-to-nearest-even, as torch's .to(dtype) does). 'VALUE:COORDINATE'
# names a mixed-precision pair: value (and output, grad_output, grad_value) in VALUE,
# sampling_locations / attention_weights (and their gradients) in COORDINATE.
EMULATOR_DTYPES = ('float', 'double', 'half', 'bfloat16', 'float:double', 'half:float',
                   'half:double', 'bfloat16:float', 'bfloat16:double')


def split_dtype(dtype):
    """'bfloat16:float' -> ('bfloat16', 'float'); 'half' -> ('half', 'half')."""
    value_dtype, _, coordinate_dtype = dtype.partition(':')
    return value_dtype, coordinate_dtype or value_dtype


def emulate(binary, work_dir, dtype, value, spatial_shapes, level_start_index,
            sampling_locations, attention_weights, grad_output, num_sms=1, value_offset=0,
            timeout=300):
    """Runs forward and backward in the emulator. Array inputs are float64 / int64 numpy arrays
    with the op's shapes; returns float64 arrays (output, grad_value, grad_sampling_locations,
    grad_attention_weights), each holding values of `dtype`. `num_sms` sizes the grid (few SMs ->
    the grid-stride loop runs several rounds); `value_offset` elements misalign value."""
    import numpy as np
    if dtype not in EMULATOR_DTYPES:
        raise ValueError(f'dtype must be one of {EMULATOR_DTYPES}, got {dtype!r}')
    B, S, heads, C = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    os.makedirs(work_dir, exist_ok=True)
    with open(osp.join(work_dir, 'meta.txt'), 'w') as f:
        f.write(f'{dtype} {B} {S} {heads} {C} {Q} {L} {P} {num_sms} {value_offset}\n')
    arrays = dict(spatial_shapes=(spatial_shapes, np.int64),
                  level_start_index=(level_start_index, np.int64), value=(value, np.float64),
                  sampling_locations=(sampling_locations, np.float64),
                  attention_weights=(attention_weights, np.float64),
                  grad_output=(grad_output, np.float64))
    for name, (array, np_dtype) in arrays.items():
        np.ascontiguousarray(array, dtype=np_dtype).tofile(osp.join(work_dir, f'{name}.bin'))
    proc = subprocess.run([binary, work_dir], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f'kernel emulation failed ({proc.returncode}): {proc.stdout}')
    shapes = dict(output=(B, Q, heads * C), grad_value=value.shape,
                  grad_sampling_locations=sampling_locations.shape,
                  grad_attention_weights=attention_weights.shape)
    return tuple(
        np.fromfile(osp.join(work_dir, f'{name}.bin'), dtype=np.float64).reshape(shape)
        for name, shape in shapes.items())


def emulation_problem(batch=2, heads=2, channels=8, shapes=((13, 17), (7, 9), (4, 5), (1, 1)),
                      queries=11, points=3, seed=0):
    """Random float64 inputs (numpy); ~15% of the locations fall (partly) off the maps."""
    import numpy as np
    rng = np.random.default_rng(seed)
    spatial_shapes = np.array(shapes, dtype=np.int64)
    sizes = spatial_shapes.prod(1)
    level_start_index = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    L = len(shapes)
    value = rng.standard_normal((batch, int(sizes.sum()), heads, channels))
    locations = rng.random((batch, queries, heads, L, points, 2)) * 1.3 - 0.15
    weights = rng.random((batch, queries, heads, L, points))
    weights /= weights.sum((-2, -1), keepdims=True)
    grad_output = rng.standard_normal((batch, queries, heads * channels))
    return value, spatial_shapes, level_start_index, locations, weights, grad_output


def _torch_dtype(dtype):
    import torch
    return dict(float=torch.float32, double=torch.float64, half=torch.float16,
                bfloat16=torch.bfloat16)[dtype]


def round_problem(dtype, value, spatial_shapes, level_start_index, sampling_locations,
                  attention_weights, grad_output):
    """Rounds the floating arrays to their dtype of the pair `dtype` (kept as float64), as
    torch's .to(dtype) does: then the emulator's own conversion is exact and both sides see
    identical inputs."""
    import torch
    value_dtype, coordinate_dtype = split_dtype(dtype)

    def rounded(array, name):
        return torch.from_numpy(array).to(_torch_dtype(name)).double().numpy()

    return (rounded(value, value_dtype), spatial_shapes, level_start_index,
            rounded(sampling_locations, coordinate_dtype),
            rounded(attention_weights, coordinate_dtype), rounded(grad_output, value_dtype))


def reference_outputs(value, spatial_shapes, level_start_index, sampling_locations,
                      attention_weights, grad_output):
    """Output and gradients of the grid_sample reference, in float64."""
    import torch
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from mmdet_detrx.ops import ms_deform_attn_pytorch
    inputs = [torch.from_numpy(a).requires_grad_(True)
              for a in (value, sampling_locations, attention_weights)]
    output = ms_deform_attn_pytorch(inputs[0], torch.from_numpy(spatial_shapes), inputs[1],
                                    inputs[2])
    output.backward(torch.from_numpy(grad_output))
    return tuple(t.detach().numpy() for t in [output] + [i.grad for i in inputs])


# Unit roundoff of each dtype (the final rounding of a result) and of its accumulation type.
UNIT_ROUNDOFF = dict(double=2.0**-53, float=2.0**-24, half=2.0**-11, bfloat16=2.0**-8)
# Spacing of each dtype's subnormals: the absolute error of rounding a tiny result.
SUBNORMAL_SPACING = dict(double=2.0**-1074, float=2.0**-149, half=2.0**-24, bfloat16=2.0**-133)


def emulation_error(actual, expected, dtype):
    """Largest error of the four results relative to the bound
    2 * (u_result * |expected| + s_result + 16 * u_acc * max|expected|): the final rounding to
    the result's dtype (value's for output and grad_value, the coordinates' for the other two;
    s_result covers results in its subnormal range) plus fp32 (fp64 for double coordinates)
    accumulation error of ~16 terms of the tensor's scale. <= 1 passes."""
    import numpy as np
    value_dtype, coordinate_dtype = split_dtype(dtype)
    u_acc = UNIT_ROUNDOFF['double' if coordinate_dtype == 'double' else 'float']
    result_dtypes = (value_dtype, value_dtype, coordinate_dtype, coordinate_dtype)
    worst = 0.0
    for a, e, result_dtype in zip(actual, expected, result_dtypes):
        if a.shape != e.shape:
            return float('inf')
        if e.size == 0:
            continue
        scale = np.abs(e).max()
        bound = 2 * (UNIT_ROUNDOFF[result_dtype] * np.abs(e) + SUBNORMAL_SPACING[result_dtype]
                     + 16 * u_acc * scale) + 1e-300
        worst = max(worst, float(np.nan_to_num(np.abs(a - e) / bound, nan=np.inf).max()))
    return worst


# (dtype, problem kwargs, emulate kwargs): every vector width / group size, the multi-stride
# channel loop, the scalar fallback for misaligned value and a grid-stride loop of several rounds.
EMULATION_CASES = (
    ('double', dict(channels=8), {}),
    ('float', dict(channels=32), {}),
    ('float', dict(channels=71, batch=2, heads=4, queries=40), dict(num_sms=1)),
    ('float', dict(channels=8), dict(value_offset=1)),
    ('half', dict(channels=30), {}),
    ('bfloat16', dict(channels=4, heads=3), {}),
    ('bfloat16:float', dict(channels=32), {}),
    ('half:float', dict(channels=30), {}),
    ('bfloat16:double', dict(channels=8), {}),
)


def off_map_problem(seed=0):
    """Every sampling point entirely off its map, at finite, infinite and NaN coordinates."""
    import numpy as np
    value, shapes, starts, locations, weights, grad_output = emulation_problem(seed=seed)
    far = np.array([-1e6, -1.0, 2.0, 1e6, np.inf, -np.inf, np.nan])
    locations = far[np.random.default_rng(seed).integers(len(far), size=locations.shape)]
    return value, shapes, starts, locations, weights, grad_output


def check_emulation(nvcc, out_dir, verbose, sanitize=False):
    try:
        import numpy  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        print('[emulate] skipped: needs numpy and torch (for the reference)')
        return True
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    try:
        import mmdet_detrx.ops  # noqa: F401  (the grid_sample reference)
    except ImportError as error:
        print(f'[emulate] skipped: cannot import mmdet_detrx.ops for the reference ({error})')
        return True
    start = time.time()
    binary = build_emulator(nvcc, out_dir, verbose, sanitize)
    ok = True
    for index, (dtype, problem_kwargs, emulate_kwargs) in enumerate(EMULATION_CASES):
        problem = round_problem(dtype, *emulation_problem(**problem_kwargs))
        actual = emulate(binary, osp.join(out_dir, f'case{index}'), dtype, *problem,
                         **emulate_kwargs)
        error = emulation_error(actual, reference_outputs(*problem), dtype)
        passed = error <= 1
        ok = ok and passed
        print(f'[emulate] {dtype:15s} {problem_kwargs} {emulate_kwargs}: '
              f'{"ok" if passed else "FAILED"} (error {error:.3f} of tolerance)')
    results = emulate(binary, osp.join(out_dir, 'off_map'), 'float', *off_map_problem())
    passed = not any(result.any() for result in results)
    ok = ok and passed
    print(f'[emulate] points off the maps (±1e6, ±inf, NaN) give zeros: '
          f'{"ok" if passed else "FAILED"}')
    sanitizers = ' under ASan + UBSan' if sanitize else ''
    print(f'[emulate] {"ok" if ok else "FAILED"}{sanitizers} ({time.time() - start:.1f} s)')
    return ok


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--arch', nargs='+', help='targets such as sm_80 sm_90 (default: '
                        'TORCH_CUDA_ARCH_LIST, else sm_80 sm_90)')
    parser.add_argument('--nvcc', help='nvcc executable (default: PATH, then $CUDA_HOME/bin)')
    parser.add_argument('--no-glue', action='store_true',
                        help='skip compiling the torch glue ms_deform_attn_kernel.cu')
    parser.add_argument('--no-emulate', action='store_true',
                        help='skip running the kernels in the CPU emulator')
    parser.add_argument('--sanitize', action='store_true',
                        help='build the emulator with AddressSanitizer + UBSan (slower)')
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
        if args.no_emulate:
            print('[emulate] skipped (--no-emulate)')
        else:
            ok = check_emulation(nvcc, out_dir, args.verbose, args.sanitize) and ok
    print('check_cuda_kernels: ' + ('all passed' if ok else 'FAILED'))
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
