"""Checkpoint loading that never runs code from the file, and still reads mmengine's checkpoints.

torch >= 2.6 loads with ``weights_only=True`` by default: only tensors, containers and allow-listed
globals unpickle. mmengine 0.10.7 (the release mmdet 3.3 needs) calls ``torch.load`` without the
argument, and every checkpoint its ``Runner`` writes carries ``meta``/``message_hub`` entries
(``HistoryBuffer``, numpy scalars, arrays and dtypes), so stock mmengine cannot resume or test
its own checkpoints (nor mmdet 3.x model-zoo ones, which keep ``meta``) under torch >= 2.6.

Importing ``mmdet_detrx`` therefore re-registers two of mmengine's ``CheckpointLoader`` schemes,
and nothing else:

* local paths (scheme ``''``) and ``http(s)://`` URLs load with ``weights_only=True`` while
  exactly :data:`mmengine_checkpoint_globals` are allow-listed, for that call only
  (``torch.serialization.safe_globals``; nothing is added to torch's process-wide allow-list, and
  ``torch.load`` called directly is unchanged);
* a file needing any other global (a crafted pickle, or a legacy checkpoint holding arbitrary
  objects) is refused with :class:`UnsafeCheckpointError`, naming the global, before anything in
  it runs.

``MMDET_DETRX_TRUSTED_CHECKPOINTS=1`` (or ``--trust-checkpoint`` on our tools) is the explicit
opt-in for trusted legacy pickles: those two schemes then load with ``weights_only=False``.
Other schemes (``torchvision://``, ``open-mmlab://``, ``s3://``, ...) keep mmengine's own code.
"""
import logging
import os
import os.path as osp
import pickle
import re
from typing import List

import numpy as np
import torch
from mmengine.logging import HistoryBuffer, print_log
from mmengine.runner.checkpoint import CheckpointLoader

__all__ = [
    'TRUSTED_CHECKPOINTS_ENV', 'UnsafeCheckpointError', 'mmengine_checkpoint_globals',
    'load_checkpoint_file', 'patch_mmengine_checkpoint_loading', 'trusted_checkpoints'
]

TRUSTED_CHECKPOINTS_ENV = 'MMDET_DETRX_TRUSTED_CHECKPOINTS'

# numpy 1.x pickles name ``numpy.core.multiarray``, numpy 2.x ``numpy._core.multiarray``; both
# appear in mmengine checkpoints in the wild, so each function is allow-listed under both names.
_NUMPY_MULTIARRAY = ('numpy.core.multiarray', 'numpy._core.multiarray')
# dtypes mmengine's message hub and schedulers store: bool, integers, floats, complex.
_NUMPY_DTYPE_CODES = '?bBhHiIlLqQefdgFDG'

_PATCHED = False


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint needs a global outside the allow-list, so loading it could run code."""


def trusted_checkpoints() -> bool:
    """Whether the user opted in to full-pickle loading (``MMDET_DETRX_TRUSTED_CHECKPOINTS=1``)."""
    return os.environ.get(TRUSTED_CHECKPOINTS_ENV, '').strip().lower() in ('1', 'true', 'yes')


_HISTORY_BUFFER_STATISTICS = ('min', 'max', 'current', 'mean')


def _history_buffer_statistic(owner, name: str):
    """``getattr`` restricted to what a pickled ``HistoryBuffer`` uses it for.

    Each buffer pickles its ``statistics_methods`` dict as ``getattr(HistoryBuffer, 'min')``
    etc. (protocol 2 stores unbound methods that way), so the pickle names ``builtins.getattr``.
    Allow-listing the real ``getattr`` would hand every allowed object's attributes to the file;
    this stand-in resolves only those four methods and refuses anything else.
    """
    if owner is HistoryBuffer and name in _HISTORY_BUFFER_STATISTICS:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f'getattr({owner!r}, {name!r}) is not allowed: only HistoryBuffer statistics methods '
        f'{_HISTORY_BUFFER_STATISTICS}')


def mmengine_checkpoint_globals() -> List:
    """The globals a checkpoint written by mmengine 0.10's ``Runner`` needs beyond torch's own.

    Found by saving checkpoints of real training runs (see tests/test_utils/test_safe_checkpoint.py)
    and reading ``torch.serialization.get_unsafe_globals_in_checkpoint``: the message hub's
    ``HistoryBuffer`` objects (numpy arrays inside, and ``getattr(HistoryBuffer, 'min')``-style
    references to its statistics methods), numpy scalars in ``runtime_info``, the dtypes of both,
    and each dtype's class (unpickling a dtype ``BUILD``s an instance of it).
    """
    multiarray = np._core.multiarray if hasattr(np, '_core') else np.core.multiarray
    named = []
    for module in _NUMPY_MULTIARRAY:
        named += [(multiarray.scalar, f'{module}.scalar'),
                  (multiarray._reconstruct, f'{module}._reconstruct')]
    dtype_classes = sorted({type(np.dtype(code)) for code in _NUMPY_DTYPE_CODES},
                           key=lambda cls: cls.__name__)
    named.append((_history_buffer_statistic, 'builtins.getattr'))
    return [HistoryBuffer, np.ndarray, np.dtype, *dtype_classes, *named]


def _refused(filename: str, error: Exception) -> UnsafeCheckpointError:
    found = re.search(r'GLOBAL (\S+)', str(error)) or re.search(r'but got (<[^>]+>)', str(error))
    what = f'the global {found.group(1)}' if found else 'objects other than weights'
    return UnsafeCheckpointError(
        f'refused to load checkpoint {filename}: it needs {what}, which is not on the allow-list '
        'of tensors and mmengine checkpoint types, so unpickling it could run code from the file. '
        'If you trust the file (e.g. a legacy checkpoint you wrote yourself), load it with '
        f'{TRUSTED_CHECKPOINTS_ENV}=1 in the environment or --trust-checkpoint on tools/train.py '
        f'and tools/test.py. ({type(error).__name__}: {str(error).splitlines()[-1][:300]})')


def load_checkpoint_file(filename: str, map_location=None):
    """``torch.load`` a local checkpoint safely (or fully, when the user opted in to trust it)."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'checkpoint not found: {filename}')
    if trusted_checkpoints():
        print_log(f'{TRUSTED_CHECKPOINTS_ENV}=1: loading {filename} as a full pickle '
                  '(weights_only=False); only do this for files you trust', logger='current',
                  level=logging.WARNING)
        return torch.load(filename, map_location=map_location, weights_only=False)
    try:
        with torch.serialization.safe_globals(mmengine_checkpoint_globals()):
            return torch.load(filename, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises pickle.UnpicklingError (sometimes RuntimeError)
        if 'Weights only load failed' in str(error) or 'weights_only' in str(error):
            raise _refused(filename, error) from None
        raise


def load_from_local_safe(filename, map_location=None):
    return load_checkpoint_file(filename, map_location)


def load_from_http_safe(filename, map_location=None, model_dir=None, progress=os.isatty(0)):
    """mmengine's ``load_from_http`` (rank 0 downloads first), loading the cached file safely."""
    from mmengine.dist import get_dist_info
    rank, world_size = get_dist_info()

    def load():
        weights_only = not trusted_checkpoints()
        try:
            with torch.serialization.safe_globals(mmengine_checkpoint_globals()):
                return torch.hub.load_state_dict_from_url(
                    filename, model_dir=model_dir, map_location=map_location,
                    progress=progress, weights_only=weights_only)
        except Exception as error:
            if weights_only and 'Weights only load failed' in str(error):
                raise _refused(filename, error) from None
            raise

    checkpoint = load() if rank == 0 else None
    if world_size > 1:
        torch.distributed.barrier()
        if rank > 0:
            checkpoint = load()
    return checkpoint


def patch_mmengine_checkpoint_loading() -> None:
    """Register the safe local and http(s) loaders in mmengine's ``CheckpointLoader`` (once)."""
    global _PATCHED
    if _PATCHED or not hasattr(torch.serialization, 'safe_globals'):  # torch < 2.5: mmengine's
        return
    CheckpointLoader.register_scheme(prefixes='', force=True)(load_from_local_safe)
    CheckpointLoader.register_scheme(prefixes=('http://', 'https://'),
                                     force=True)(load_from_http_safe)
    _PATCHED = True
