"""Checkpoints written atomically, and auto-resume that survives a broken or moved checkpoint.

mmengine's ``LocalBackend.put`` opens the target and writes in place, so a kill or a full disk
during ``CheckpointHook``'s save leaves a truncated ``iter_N.pth`` that ``last_checkpoint`` points
at, and ``--resume`` then fails although ``iter_{N-1}.pth`` is intact.

* :class:`AtomicLocalBackend` (file backend ``'atomic_local'``) writes to a temporary file in the
  same folder, fsyncs it, renames it over the target and fsyncs the folder: a checkpoint is either
  the old file, the complete new one, or absent. Select it for checkpoints with
  ``default_hooks.checkpoint.backend_args=dict(backend='atomic_local')``; ``tools/train.py``
  does so by default (:func:`use_atomic_checkpoints`).
* :func:`find_resumable_checkpoint` is ``--resume``'s auto mode in our tools: the checkpoint
  named by ``last_checkpoint`` if intact, else the newest intact ``iter_*/epoch_*.pth``, with a
  warning for each one skipped (intact: complete, loadable by the safe loader, and a training
  checkpoint, :func:`checkpoint_problem`); a stored absolute path that no longer exists (a
  copied or moved work dir) is looked up in the work dir by its file name.
"""
import glob
import logging
import os
import os.path as osp
import re
import tempfile
import zipfile
from typing import List, Optional, Union

from mmengine.fileio import LocalBackend, register_backend
from mmengine.logging import print_log
from mmengine.utils import mkdir_or_exist

from .file_mode import current_umask
from .safe_checkpoint import UnsafeCheckpointError, load_checkpoint_file

__all__ = [
    'AtomicLocalBackend', 'atomic_write', 'checkpoint_problem', 'find_resumable_checkpoint',
    'use_atomic_checkpoints'
]

_CHECKPOINT_NAME = re.compile(r'^(?:iter|epoch)_(\d+)\.pth$')


def atomic_write(filepath: str, data: bytes) -> None:
    """Replace ``filepath`` by ``data`` all at once: temp file, fsync, rename, fsync the folder."""
    folder = osp.dirname(osp.abspath(filepath))
    fd, tmp = tempfile.mkstemp(prefix=f'.{osp.basename(filepath)}.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes 0600; the file open() would have created honours the umask
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, filepath)
    except BaseException:
        if osp.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend whose ``put``/``put_text`` replace files atomically."""

    def put(self, obj: bytes, filepath: Union[str, os.PathLike]) -> None:
        filepath = os.fspath(filepath)
        mkdir_or_exist(osp.dirname(filepath) or '.')
        atomic_write(filepath, obj)

    def put_text(self, obj: str, filepath: Union[str, os.PathLike],
                 encoding: str = 'utf-8') -> None:
        self.put(obj.encode(encoding), filepath)


register_backend('atomic_local', AtomicLocalBackend, force=True)


def use_atomic_checkpoints(cfg) -> None:
    """Make the config's ``CheckpointHook`` write local checkpoints atomically.

    Left alone: a config without a checkpoint hook, one that already names a storage backend
    (``backend_args``/``file_client_args``), or an ``out_dir`` on remote storage.
    """
    hook = (cfg.get('default_hooks') or {}).get('checkpoint')
    if not hook or hook.get('backend_args') or hook.get('file_client_args'):
        return
    if '://' in str(hook.get('out_dir') or ''):
        return
    hook['backend_args'] = dict(backend='atomic_local')


def _not_resumable(checkpoint) -> Optional[str]:
    """Why a loaded object is not a checkpoint ``Runner.resume`` can use, or None."""
    if not isinstance(checkpoint, dict):
        return f'not a training checkpoint: it holds a {type(checkpoint).__name__}, not a dict'
    missing = [key for key in ('meta', 'state_dict', 'message_hub') if key not in checkpoint]
    if missing:
        return f'not a training checkpoint: no {", ".join(missing)}'
    meta = checkpoint['meta']
    if not isinstance(meta, dict) or not all(
            isinstance(meta.get(key), int) and not isinstance(meta.get(key), bool)
            for key in ('epoch', 'iter')):
        return "not a training checkpoint: meta has no int 'epoch' and 'iter'"
    if not isinstance(checkpoint['state_dict'], dict):
        return 'not a training checkpoint: state_dict is not a dict'
    return None


def checkpoint_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be resumed from (missing, truncated, corrupt, not a training
    checkpoint), or None if it can.

    torch's zip format stores a CRC-32 per record and the directory at the end, so a truncated
    or damaged file fails ``testzip``. The file is then loaded with the safe loader (zip files
    memory-mapped, so tensor data is not read) and must be what ``Runner.resume`` reads: a dict
    with ``meta`` (int ``epoch`` and ``iter``), ``state_dict`` and ``message_hub``. A file the
    safe loader refuses counts as intact: resuming from it stops with the loader's explanation
    (and how to trust it) instead of silently resuming an older checkpoint.
    """
    if not osp.isfile(path):
        return 'file not found'
    if osp.getsize(path) == 0:
        return 'empty file'
    try:
        with open(path, 'rb') as f:
            zip_magic = f.read(4) == b'PK\x03\x04'
        if zip_magic and not zipfile.is_zipfile(path):
            return 'truncated: its zip directory is missing'
        if zip_magic:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad:
                return f'corrupt record {bad}'
        checkpoint = load_checkpoint_file(path, map_location='cpu', mmap=zip_magic or None)
    except UnsafeCheckpointError:
        return None  # readable; loading it will refuse it with the full explanation
    except Exception as error:  # zipfile.BadZipFile, EOFError, CorruptCheckpointError, ...
        return f'{type(error).__name__}: {error}'
    return _not_resumable(checkpoint)


def _stored_last_checkpoint(work_dir: str) -> Optional[str]:
    """The path in ``work_dir/last_checkpoint``, re-rooted in ``work_dir`` if it has moved."""
    record = osp.join(work_dir, 'last_checkpoint')
    try:
        with open(record) as f:
            stored = f.read().strip()
    except OSError:
        return None
    if not stored:
        return None
    if osp.exists(stored) or '://' in stored:
        return stored
    local = osp.join(work_dir, osp.basename(stored))
    if osp.exists(local):
        print_log(f'last_checkpoint names {stored}, which does not exist (work dir copied or '
                  f'moved?): using {local}', logger='current', level=logging.WARNING)
        return local
    return stored


def find_resumable_checkpoint(work_dir: str) -> Optional[str]:
    """The newest intact checkpoint to auto-resume from in ``work_dir``, or None."""
    candidates: List[str] = []
    stored = _stored_last_checkpoint(work_dir)
    if stored:
        candidates.append(stored)
    numbered = []
    for path in glob.glob(osp.join(glob.escape(work_dir), '*.pth')):
        match = _CHECKPOINT_NAME.match(osp.basename(path))
        if match:
            numbered.append((int(match.group(1)), osp.getmtime(path), path))
    for _, _, path in sorted(numbered, reverse=True):
        if not candidates or osp.abspath(path) != osp.abspath(candidates[0]):
            candidates.append(path)
    for path in candidates:
        if '://' in path:
            return path  # remote storage: mmengine's loader reports its own errors
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        print_log(f'cannot resume from {path} ({problem}); trying the previous checkpoint',
                  logger='current', level=logging.WARNING)
    return None
