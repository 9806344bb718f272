"""Build mmdet-detrx and its native extension ``mmdet_detrx._C``.

The extension is compiled against the torch of the environment it is built in and only works
with that torch minor version, so the built metadata pins ``torch==X.Y.*``. ``pip install .``
works with or without build isolation (``pyproject.toml`` names an in-tree backend,
``build_tools/detrx_backend.py``, that compiles against the environment's own torch instead of
downloading one); without torch the build stops with what to run.

C++ sources under ``ops/`` (``ops/*.cpp``, ``ops/cpu/*.cpp``) are always built. The CUDA sources
(``ops/cuda/*.cu``) are added when torch sees a GPU and a CUDA toolkit, or with ``FORCE_CUDA=1``
(cross-building without a GPU; needs a CUDA build of torch). Architectures:
``TORCH_CUDA_ARCH_LIST`` if set, else the visible GPUs (torch's choice), else
``build_tools/cuda_arch.py``'s ``DEFAULT_CROSS_ARCH_LIST`` (sm_70..sm_90 + PTX).
``MMDET_DETRX_NO_EXT=1`` skips the extension (the ops then fall back to PyTorch).

The configs under ``configs/`` ship inside the package as ``mmdet_detrx/.mim/configs`` (a
symlink in the repository, real files in the wheel), where mmengine looks for
``mmdet_detrx::...`` configs, as for ``mmdet::...``.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, 'build_tools'))
from cuda_arch import CudaArchError, nvcc_supported_archs, resolve_arch_list  # noqa: E402

NO_TORCH = """
mmdet-detrx compiles a C++ (and CUDA) extension against the torch of the environment it is
installed into, but this build cannot import torch ({error}).

  * Install torch first (the build for your platform: https://pytorch.org/get-started/locally/),
    then run the same command again, e.g.
        pip install .                         # or: pip install -e .
  * If torch is installed but the build still cannot see it (an unusual layout, PYTHONPATH, ...):
        pip install --no-build-isolation .
  * Or install without the extension (the ops then run the slower PyTorch fallback):
        MMDET_DETRX_NO_EXT=1 pip install .
"""


def _read_version():
    scope = {}
    with open(os.path.join(ROOT, 'mmdet_detrx', 'version.py')) as f:
        exec(f.read(), scope)
    return scope['__version__']


def _sources(pattern):
    # Relative paths: setuptools rejects absolute source paths in editable builds.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _import_torch():
    try:
        import torch
    except ImportError as error:
        sys.exit(NO_TORCH.format(error=error))
    return torch


def _torch_requirement(torch):
    """The extension's C++ ABI is that of the torch it was compiled against: same minor only."""
    major, minor = torch.__version__.split('+')[0].split('.')[:2]
    return f'torch=={major}.{minor}.*'


def _cuda_arch_list(torch, cuda_home):
    """Validates / chooses TORCH_CUDA_ARCH_LIST (see build_tools/cuda_arch.py)."""
    nvcc = os.path.join(cuda_home, 'bin', 'nvcc')
    try:
        arch_list = resolve_arch_list(os.environ.get('TORCH_CUDA_ARCH_LIST'),
                                      gpu_visible=torch.cuda.device_count() > 0,
                                      supported=nvcc_supported_archs(nvcc), nvcc=nvcc)
    except CudaArchError as error:
        sys.exit(f'error: {error}')
    if arch_list is not None:
        os.environ['TORCH_CUDA_ARCH_LIST'] = arch_list


# CPU kernels compiled once per instruction-set level (ops/cpu/isa/<name>_<LEVEL>.cpp, each
# including one kernel source) and chosen at load time (ops/cpu/cpu_capability.h). The wheel stays
# portable: nothing else gets an -m flag, and a level runs only on a CPU that has it.
CPU_ISA_FLAGS = {
    'DEFAULT': [],
    'AVX2': ['-mavx2', '-mfma', '-mf16c'],
    'AVX512': ['-mavx2', '-mfma', '-mf16c', '-mavx512f', '-mavx512bw', '-mavx512vl', '-mavx512dq'],
}


def _cpu_isa_sources():
    """{level: sources} and the DETRX_CPU_<LEVEL> macros of the levels this build compiles:
    every level on x86-64 with GCC / Clang, DEFAULT alone elsewhere."""
    import platform
    x86 = platform.machine().lower() in ('x86_64', 'amd64') and os.name == 'posix'
    levels = list(CPU_ISA_FLAGS) if x86 else ['DEFAULT']
    if os.getenv('MMDET_DETRX_CPU_BASELINE_ONLY') == '1':  # e.g. a compiler without AVX-512
        levels = ['DEFAULT']
    sources = {level: _sources(f'ops/cpu/isa/*_{level}.cpp') for level in levels}
    macros = [(f'DETRX_CPU_{level}', None) for level in levels if level != 'DEFAULT']
    return sources, macros


def _per_isa_build_ext(base):
    """build_ext that compiles each level's sources with its flags (the ninja compile of torch's
    BuildExtension takes one flag set per call) and links them after the other objects, DEFAULT
    first: the linker keeps the first copy of an inline function emitted by several objects,
    so shared inline code is the baseline's."""

    class PerIsaBuildExt(base):
        def build_extension(self, ext):
            isa_sources = getattr(ext, 'isa_sources', {})
            objects = []
            for level, level_sources in isa_sources.items():
                if not level_sources:
                    continue
                cflags = dict(ext.extra_compile_args)
                cflags['cxx'] = list(cflags.get('cxx', [])) + CPU_ISA_FLAGS[level]
                objects += self.compiler.compile(
                    level_sources, output_dir=self.build_temp, macros=ext.define_macros,
                    include_dirs=ext.include_dirs, debug=self.debug, extra_postargs=cflags,
                    depends=ext.depends)
            ext.extra_objects = list(ext.extra_objects or []) + objects
            super().build_extension(ext)

    return PerIsaBuildExt


def _extensions():
    if os.getenv('MMDET_DETRX_NO_EXT') == '1':
        return [], {}, 'torch>=2.4'
    torch = _import_torch()
    from torch.utils.cpp_extension import (CUDA_HOME, BuildExtension, CppExtension,
                                           CUDAExtension)

    sources = _sources('ops/*.cpp') + _sources('ops/cpu/*.cpp')
    isa_sources, isa_macros = _cpu_isa_sources()
    include_dirs = [os.path.join(ROOT, 'ops')]
    cxx_flags = ['-O3']  # the C++ standard is torch.utils.cpp_extension's choice
    link_flags = []
    if os.name == 'posix':
        # at::parallel_for is a header template: without -fopenmp its OpenMP pragmas are
        # ignored and the CPU kernels would silently run on one thread.
        cxx_flags.append('-fopenmp')
        link_flags.append('-fopenmp')

    force_cuda = os.getenv('FORCE_CUDA') == '1'
    with_cuda = force_cuda or (torch.cuda.is_available() and CUDA_HOME is not None)
    if with_cuda:
        if torch.version.cuda is None:
            sys.exit(f'error: FORCE_CUDA=1 needs a CUDA build of torch; torch '
                     f'{torch.__version__} is CPU-only. Install a CUDA torch, or unset FORCE_CUDA '
                     'to build the CPU extension only.')
        if CUDA_HOME is None:
            sys.exit('error: FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to it '
                     '(the directory with bin/nvcc).')
        _cuda_arch_list(torch, CUDA_HOME)
        ext = CUDAExtension(
            'mmdet_detrx._C',
            sources + _sources('ops/cuda/*.cu'),
            include_dirs=include_dirs,
            define_macros=[('WITH_CUDA', None)] + isa_macros,
            extra_compile_args={'cxx': cxx_flags, 'nvcc': ['-O3', '-lineinfo']},
            extra_link_args=link_flags)
    else:
        ext = CppExtension(
            'mmdet_detrx._C',
            sources,
            include_dirs=include_dirs,
            define_macros=isa_macros,
            extra_compile_args={'cxx': cxx_flags},
            extra_link_args=link_flags)
    ext.isa_sources = isa_sources
    cmdclass = {'build_ext': _per_isa_build_ext(BuildExtension).with_options(use_ninja=True)}
    return [ext], cmdclass, _torch_requirement(torch)


ext_modules, cmdclass, torch_requirement = _extensions()

# The op layer (mmdet_detrx.ops) needs torch and numpy only; everything registering into mmdet
# needs an mmdet stack: OpenMMLab's (mmengine/mmcv/mmdet) or VBTI's fork (onedl-mmengine/
# onedl-mmcv/onedl-mmdetection), which installs the same modules, so neither can be a
# requirement (pip would install the other beside it). Extras: [openmmlab] (also [mmdet], its old
# name) and [onedl]; the supported ranges live in mmdet_detrx/stacks.py, which also checks the
# installed stack at import. mmcv (with ops) has no PyTorch-matching CPU wheel on PyPI: pip
# would build it in an isolated environment against a freshly downloaded torch. In an existing
# mmdet environment it is already there.
def _stack_requirements():
    scope = {}
    with open(os.path.join(ROOT, 'mmdet_detrx', 'stacks.py')) as f:
        exec(f.read(), scope)
    return {name: scope['requirements'](name) + ['scipy', 'pycocotools', 'matplotlib']
            for name in scope['STACKS']}


STACK_REQUIREMENTS = _stack_requirements()

setup(
    name='mmdet-detrx',
    version=_read_version(),
    description='DETR-era components for MMDetection 3.x: native multi-scale deformable '
    'attention, ACT, MTKD distillation and BoTNet backbones',
    long_description=open(os.path.join(ROOT, 'README.md')).read()
    if os.path.exists(os.path.join(ROOT, 'README.md')) else '',
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.9',
    packages=find_packages(include=['mmdet_detrx', 'mmdet_detrx.*']),
    # mmengine resolves `mmdet_detrx::dir/config.py` to mmdet_detrx/.mim/configs/dir/config.py.
    # ops/*.def: the op's dtype table, read by the Python side too (the C++ build includes it).
    package_data={'mmdet_detrx': ['.mim/model-index.yml', '.mim/configs/**/*.py',
                                  '.mim/configs/**/*.md', 'ops/*.def']},
    install_requires=[torch_requirement, 'numpy'],
    extras_require={
        'mmdet': STACK_REQUIREMENTS['openmmlab'],
        'openmmlab': STACK_REQUIREMENTS['openmmlab'],
        'onedl': STACK_REQUIREMENTS['onedl'],
        # mmdet's analysis tools (benchmark.py, analyze_logs.py), the TensorBoard backend and
        # the HF transformers pair of benchmark_detectors (pinned: the converters' tested version).
        'analysis': ['tensorboard', 'psutil', 'seaborn', 'transformers==5.23.0'],
        # ONNX export (detrx-export) and its ONNX Runtime check / benchmark.
        'deploy': ['onnx', 'onnxruntime'],
        # transformers: the HF converter parity tests (tests/test_converters/test_hf_*.py).
        'tests': ['pytest', 'pytest-timeout', 'hypothesis', 'transformers==5.23.0'],
    },
    # The user tools without a clone: `detrx-train CONFIG ...` = `python -m mmdet_detrx.tools.train
    # CONFIG ...` = `python tools/train.py CONFIG ...` in a clone (mmdet_detrx/tools/console.py).
    entry_points={'console_scripts': [
        f'detrx-{name.replace("_", "-")} = mmdet_detrx.tools.console:{name}' for name in (
            'train', 'test', 'export', 'convert', 'act_tradeoff', 'calibrate_act',
            'benchmark_act', 'benchmark_backbones', 'benchmark_botnet', 'benchmark_detectors',
            'benchmark_msda', 'benchmark_onnx', 'browse_dataset', 'compare_ap', 'get_flops',
            'visualize_act_clusters', 'visualize_deform_points')
    ]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
