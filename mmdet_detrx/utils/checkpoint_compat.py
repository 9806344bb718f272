"""Let mmengine 0.10.x read its own checkpoints under torch >= 2.6.

torch 2.6 made ``torch.load(weights_only=True)`` the default. mmengine 0.10.7 (the latest release,
required by mmdet 3.3) calls ``torch.load`` without the argument, and its checkpoints carry a
``HistoryBuffer`` and numpy scalars in ``meta.message_hub``, so ``--resume``, ``load_from`` and
``tools/test.py`` fail on every checkpoint mmengine itself wrote. Allow-listing those globals is
not enough (numpy dtypes unpickle through ``builtins.getattr``), so, as torch < 2.6 did, local
checkpoints are loaded with ``weights_only=False``. Only load checkpoints you trust.
"""
import os.path as osp

import mmengine
import torch
from mmengine.runner.checkpoint import CheckpointLoader
from mmengine.utils import digit_version

_PATCHED = False


def _load_local_checkpoint(filename, map_location):
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'checkpoint not found: {filename}')
    return torch.load(filename, map_location=map_location, weights_only=False)


def patch_mmengine_checkpoint_loading() -> None:
    global _PATCHED
    needed = (digit_version(torch.__version__.split('+')[0]) >= digit_version('2.6.0')
              and digit_version(mmengine.__version__) <= digit_version('0.10.7'))
    if needed and not _PATCHED:
        CheckpointLoader.register_scheme(prefixes='', force=True)(_load_local_checkpoint)
        _PATCHED = True
