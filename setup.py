"""Build mmdet-detrx and its native extension ``mmdet_detrx._C``.

C++ sources under ``ops/`` (``ops/*.cpp``, ``ops/cpu/*.cpp``) are always built. The CUDA sources
(``ops/cuda/*.cu``) are added when torch sees a GPU with a CUDA toolkit, or when ``FORCE_CUDA=1``
(cross-building on a machine without a GPU); ``TORCH_CUDA_ARCH_LIST`` is honoured and defaults to
sm_80 + sm_90. ``MMDET_DETRX_NO_EXT=1`` skips the extension (the ops then fall back to PyTorch).
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _read_version():
    scope = {}
    with open(os.path.join(ROOT, 'mmdet_detrx', 'version.py')) as f:
        exec(f.read(), scope)
    return scope['__version__']


def _sources(pattern):
    # Relative paths: setuptools rejects absolute source paths in editable builds.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extensions():
    if os.getenv('MMDET_DETRX_NO_EXT') == '1':
        return [], {}
    import torch
    from torch.utils.cpp_extension import (CUDA_HOME, BuildExtension, CppExtension,
                                           CUDAExtension)

    sources = _sources('ops/*.cpp') + _sources('ops/cpu/*.cpp')
    include_dirs = [os.path.join(ROOT, 'ops')]
    cxx_flags = ['-O3']  # the C++ standard is torch.utils.cpp_extension's choice
    link_flags = []
    if os.name == 'posix':
        # at::parallel_for is a header template: without -fopenmp its OpenMP pragmas are
        # ignored and the CPU kernels would silently run on one thread.
        cxx_flags.append('-fopenmp')
        link_flags.append('-fopenmp')

    with_cuda = os.getenv('FORCE_CUDA') == '1' or (torch.cuda.is_available()
                                                    and CUDA_HOME is not None)
    if with_cuda:
        os.environ.setdefault('TORCH_CUDA_ARCH_LIST', '8.0;9.0')
        ext = CUDAExtension(
            'mmdet_detrx._C',
            sources + _sources('ops/cuda/*.cu'),
            include_dirs=include_dirs,
            define_macros=[('WITH_CUDA', None)],
            extra_compile_args={'cxx': cxx_flags, 'nvcc': ['-O3', '-lineinfo']},
            extra_link_args=link_flags)
    else:
        ext = CppExtension(
            'mmdet_detrx._C',
            sources,
            include_dirs=include_dirs,
            extra_compile_args={'cxx': cxx_flags},
            extra_link_args=link_flags)
    return [ext], {'build_ext': BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

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
    install_requires=['torch>=2.4', 'numpy'],
    extras_require={
        'mmdet': ['mmengine>=0.10.4,<0.11', 'mmcv>=2.0.0,<2.2.0', 'mmdet==3.3.0', 'scipy',
                  'pycocotools', 'matplotlib'],
        'tests': ['pytest', 'pytest-timeout', 'hypothesis'],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
