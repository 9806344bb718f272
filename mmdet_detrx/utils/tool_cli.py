"""What our train and test tools (``mmdet_detrx.tools.train``, ``.test``) add to mmdet's.

* :func:`add_runner_args` / :func:`parse_tool_args`: the flags both take (``--cfg-options``,
  ``--allow-partial-load``, ``--trust-checkpoint``, ``--launcher``, ``--local_rank``), and
  ``LOCAL_RANK`` set from the last for mmengine.
* :func:`load_tool_config`: the config with those flags applied (``--cfg-options`` through
  :func:`~mmdet_detrx.utils.merge_cfg_options`) and the work dir mmdet's tools default to.
* :func:`require_checkpoint_match`: ``CheckpointMatchHook`` unless ``--allow-partial-load``.
* :func:`tool_runner`: the config's runner, inside the CPU process-group set-up and teardown,
  with glibc's malloc tuned for tensor-sized blocks (:mod:`~mmdet_detrx.utils.malloc_tuning`).
"""
import argparse
import contextlib
import os
import os.path as osp
from typing import Iterator

from mmengine.config import Config, DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from .cfg_options import merge_cfg_options
from .malloc_tuning import tune_malloc
from .safe_checkpoint import TRUSTED_CHECKPOINTS_ENV
from .setup_env import distributed_teardown, setup_cpu_distributed

__all__ = [
    'add_runner_args', 'parse_tool_args', 'load_tool_config', 'require_checkpoint_match',
    'tool_runner'
]


def add_runner_args(parser: argparse.ArgumentParser, partial_load_help: str) -> None:
    """Add the flags both tools share; ``partial_load_help`` starts ``--allow-partial-load``'s
    help with what the tool does with the checkpoint (e.g. ``'evaluate a checkpoint'``)."""
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings in the config, key=value (unknown top-level keys '
                        'fail; data_root=DIR moves the dataloaders and evaluators together)')
    parser.add_argument('--allow-partial-load', action='store_true',
                        help=f'{partial_load_help} whose keys do not match the model (default: '
                        'refuse it, listing the keys)')
    parser.add_argument('--trust-checkpoint', action='store_true',
                        help=f'load checkpoints as full pickles (weights_only=False), for '
                        f'trusted legacy files only; same as {TRUSTED_CHECKPOINTS_ENV}=1')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def parse_tool_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """``parser.parse_args(argv)``; ``--local_rank`` exported as ``LOCAL_RANK`` unless it is set."""
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def load_tool_config(args: argparse.Namespace) -> Config:
    """``args.config`` with ``--trust-checkpoint``, ``--launcher``, ``--cfg-options`` and
    ``--work-dir`` applied; without a work dir anywhere, ``./work_dirs/<config name>`` as mmdet's.
    """
    if args.trust_checkpoint:
        os.environ[TRUSTED_CHECKPOINTS_ENV] = '1'
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        merge_cfg_options(cfg, args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    return cfg


def require_checkpoint_match(cfg: Config, allow_partial_load: bool) -> None:
    """Append ``CheckpointMatchHook`` (refuses a checkpoint that does not fit the model)."""
    if not allow_partial_load:
        cfg.custom_hooks = [*(cfg.get('custom_hooks') or []), dict(type='CheckpointMatchHook')]


@contextlib.contextmanager
def tool_runner(cfg: Config, launcher: str) -> Iterator[Runner]:
    """The runner of ``cfg`` (``runner_type`` if it names one), built after the gloo group a CPU
    ``--launcher pytorch`` needs, with glibc's malloc tuned (:func:`tune_malloc`, logged); the
    process group is torn down on leaving."""
    _, malloc_line = tune_malloc()
    with distributed_teardown():
        setup_cpu_distributed(cfg, launcher)
        runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
        runner.logger.info(malloc_line)
        yield runner
