"""Evaluate a checkpoint: ``python tools/test.py CONFIG CHECKPOINT [--out F.pkl] [--show-dir D]``.

Mirrors MMDetection's ``tools/test.py`` (``--tta`` included) and registers mmdet-detrx's modules
first. Beyond it: the checkpoint must match the model (``CheckpointMatchHook``) unless
``--allow-partial-load``; unknown top-level ``--cfg-options`` keys fail and ``data_root=X`` moves
every dataset path.
"""
import argparse
import os
import os.path as osp

from mmengine.config import Config, ConfigDict, DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

import mmdet_detrx  # noqa: F401  (registers our modules)
from mmdet_detrx.utils import (TRUSTED_CHECKPOINTS_ENV, check_dataset_files, distributed_teardown,
                               merge_cfg_options, setup_cpu_distributed)


def parse_args():
    parser = argparse.ArgumentParser(description='Test (and evaluate) a detector')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='the dir to save the evaluation metrics')
    parser.add_argument('--out', type=str, help='dump predictions to a pickle file (.pkl)')
    parser.add_argument('--show', action='store_true', help='show prediction results')
    parser.add_argument('--show-dir', help='save images with predictions drawn into this dir '
                        '(relative to the work dir\'s timestamped folder, as in mmdet)')
    parser.add_argument('--wait-time', type=float, default=2, help='the interval of show (s)')
    parser.add_argument('--tta', action='store_true',
                        help="test-time augmentation with the config's tta_model and tta_pipeline")
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings in the config, key=value (unknown top-level keys '
                        'fail; data_root=DIR moves the dataloaders and evaluators together)')
    parser.add_argument('--allow-partial-load', action='store_true',
                        help='evaluate a checkpoint whose keys do not match the model (default: '
                        'refuse it, listing the keys)')
    parser.add_argument('--trust-checkpoint', action='store_true',
                        help=f'load the checkpoint as a full pickle (weights_only=False), for '
                        f'trusted legacy files only; same as {TRUSTED_CHECKPOINTS_ENV}=1')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def trigger_visualization_hook(cfg, args):
    default_hooks = cfg.default_hooks
    if 'visualization' not in default_hooks:
        raise RuntimeError('--show/--show-dir need default_hooks.visualization '
                           '(DetVisualizationHook) in the config')
    hook = default_hooks['visualization']
    hook['draw'] = True
    if args.show:
        hook['show'] = True
        hook['wait_time'] = args.wait_time
    if args.show_dir:
        hook['test_out_dir'] = args.show_dir
    return cfg


def use_tta(cfg):
    """Wrap the model in ``cfg.tta_model`` and test on ``cfg.tta_pipeline``, as mmdet's tool."""
    missing = [key for key in ('tta_model', 'tta_pipeline') if not cfg.get(key)]
    if missing:
        raise KeyError(f'--tta needs {" and ".join(missing)} in the config (e.g. tta_model = '
                       "dict(type='DetTTAModel', tta_cfg=...) and a tta_pipeline ending in "
                       "TestTimeAug, as in configs/_base_/datasets/synthetic_shapes.py); "
                       'this config defines none')
    cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
    dataset = cfg.test_dataloader.dataset
    while 'dataset' in dataset:  # RepeatDataset / ClassBalancedDataset wrappers
        dataset = dataset['dataset']
    dataset.pipeline = cfg.tta_pipeline
    return cfg


def main():
    args = parse_args()
    if not osp.isfile(args.checkpoint) and '://' not in args.checkpoint:
        raise FileNotFoundError(f'checkpoint not found: {args.checkpoint}')
    if args.out is not None and not args.out.endswith(('.pkl', '.pickle')):
        raise ValueError(f'--out must be a .pkl/.pickle file, got {args.out}')

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
    cfg.load_from = args.checkpoint

    if args.show or args.show_dir:
        cfg = trigger_visualization_hook(cfg, args)
    if args.tta:
        cfg = use_tta(cfg)
    if not args.allow_partial_load:
        cfg.custom_hooks = [*(cfg.get('custom_hooks') or []), dict(type='CheckpointMatchHook')]
    check_dataset_files(cfg, ('test_dataloader', ))
    with distributed_teardown():
        setup_cpu_distributed(cfg, args.launcher)
        runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
        if args.out is not None:
            from mmdet.evaluation import DumpDetResults
            runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=args.out))
        runner.test()


if __name__ == '__main__':
    main()
