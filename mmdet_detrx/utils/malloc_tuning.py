"""Keep glibc's malloc from returning large freed blocks to the kernel between iterations.

PyTorch's CPU allocator asks ``malloc`` for every tensor and frees it when the tensor dies; it
keeps no cache. glibc serves blocks above its mmap threshold (128 KiB, raised at run time to at
most 32 MiB) with a fresh ``mmap`` and gives them back with ``munmap`` on free, and trims the
heap top above 128 KiB (or twice the raised threshold). A DETR encoder at 800x1333 makes and
drops ~20 MiB token tensors and ~90 MiB FFN activations in every layer, so each inference faults
in ~1.6 GB of zeroed pages again: ~410 000 minor page faults per image for our Deformable DETR
R50. Tuned, one inference took 2.41 s instead of 2.69 s, and mmdet's stock model 5.48 s instead
of 7.68 s (2 threads, 2-core AMD EPYC VM, docs/benchmarks.md).

:func:`tune_malloc` sets three limits with ``mallopt`` (mmap threshold 1 GiB, no trimming, top
pad 64 MiB), the process-wide setting that ``MALLOC_MMAP_THRESHOLD_`` and friends make from the
environment, so freed blocks are reused from the heap: the page faults drop to ~0 after the
first iterations. Trimming is off, not just raised: ``mallopt`` takes an ``int``, so a trim
threshold stops at 2 GiB, and a train step frees more than that after its backward (Deformable
DETR R50, batch 1: a ~5 GiB peak), which was then trimmed and faulted in again on every step.

The process keeps the memory it has used at its peak instead of returning it between
iterations, as PyTorch's CUDA caching allocator does on GPUs, and the peak grows somewhat: a
block freed inside the heap fits a later request of another size less well than a fresh
mapping does. Measured resident-set growth of one inference at 800x1333 (benchmark_detectors,
2026-12-06): ours 478 -> 546 MiB (Deformable DETR) and 550 -> 556 MiB (DINO), mmdet's stock
models 1478 -> 2069 and 1459 -> 2057 MiB.

Our ``train``/``test`` tools call it at start-up (:func:`~mmdet_detrx.utils.tool_cli.tool_runner`),
as do the benchmark tools; your own scripts can call ``mmdet_detrx.utils.tune_malloc()``. It
changes nothing, and says why, when:

* ``MMDET_DETRX_MALLOC=default`` is set (the opt-out);
* the process does not use glibc's malloc (another C library, macOS, Windows, or jemalloc /
  tcmalloc in ``LD_PRELOAD``, which have their own caches);
* glibc's malloc is already tuned from the environment (``MALLOC_*_`` variables or
  ``glibc.malloc`` in ``GLIBC_TUNABLES``): yours are kept.
"""
import ctypes
import ctypes.util
import os
from typing import Tuple

__all__ = ['MALLOC_ENV', 'MALLOC_SETTINGS', 'tune_malloc']

MALLOC_ENV = 'MMDET_DETRX_MALLOC'
_MALLOC_CHOICES = ('tuned', 'default')
# mallopt parameter numbers, from glibc's <malloc.h>
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MALLOC_SETTINGS = (  # (name, mallopt parameter, value)
    ('mmap_threshold', _M_MMAP_THRESHOLD, 1 << 30),
    ('trim_threshold', _M_TRIM_THRESHOLD, -1),  # never trim: a train step's peak is > 2 GiB
    ('top_pad', _M_TOP_PAD, 64 << 20),
)
_GLIBC_MALLOC_ENV = ('MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_', 'MALLOC_TOP_PAD_',
                     'MALLOC_MMAP_MAX_', 'MALLOC_ARENA_MAX')
_OTHER_ALLOCATORS = ('jemalloc', 'tcmalloc', 'mimalloc')
_applied = False


def _glibc():
    """The process's C library if it is glibc (it has ``gnu_get_libc_version``), else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version
        libc.mallopt
    except (OSError, AttributeError, TypeError):
        return None
    return libc


def tune_malloc() -> Tuple[bool, str]:
    """Apply :data:`MALLOC_SETTINGS` with glibc's ``mallopt``, once per process.

    Returns ``(applied, reason)``: whether the settings are in force now, and a line saying what
    was done or why nothing was. Raises ``ValueError`` naming ``MMDET_DETRX_MALLOC`` for a value
    other than ``tuned`` or ``default``.
    """
    global _applied
    choice = os.environ.get(MALLOC_ENV, 'tuned').strip().lower() or 'tuned'
    if choice not in _MALLOC_CHOICES:
        raise ValueError(f'{MALLOC_ENV} must be one of {_MALLOC_CHOICES}, got '
                         f'{os.environ[MALLOC_ENV]!r}')
    if _applied:
        return True, 'malloc: already tuned in this process'
    if choice == 'default':
        return False, f'malloc: left as is ({MALLOC_ENV}=default)'
    preload = os.environ.get('LD_PRELOAD', '')
    other = [name for name in _OTHER_ALLOCATORS if name in preload]
    if other:
        return False, f'malloc: left as is ({other[0]} is preloaded)'
    set_by_env = [name for name in _GLIBC_MALLOC_ENV if name in os.environ]
    if set_by_env or 'glibc.malloc' in os.environ.get('GLIBC_TUNABLES', ''):
        return False, (f'malloc: left as is (set from the environment: '
                       f'{", ".join(set_by_env) or "GLIBC_TUNABLES"})')
    libc = _glibc()
    if libc is None:
        return False, 'malloc: left as is (not glibc)'
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    refused = [name for name, param, value in MALLOC_SETTINGS if libc.mallopt(param, value) != 1]
    if refused:
        return False, f'malloc: glibc refused {", ".join(refused)}'
    _applied = True
    settings = ', '.join(f'{name} {value >> 20} MiB' if value >= 0 else f'{name} off'
                         for name, _, value in MALLOC_SETTINGS)
    return True, f'malloc: glibc tuned for reuse of large blocks ({settings})'
