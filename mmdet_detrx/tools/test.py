"""Evaluate a checkpoint: ``detrx-test CONFIG CHECKPOINT [--out F.pkl] [--show-dir D]``.

Also ``python -m mmdet_detrx.tools.test`` or, in a clone, ``python tools/test.py``.

Mirrors MMDetection's ``tools/test.py`` (``--tta`` included) and registers mmdet-detrx's modules
first. Beyond it: the checkpoint must match the model (``CheckpointMatchHook``) unless
``--allow-partial-load``; unknown top-level ``--cfg-options`` keys fail and ``data_root=X`` moves
every dataset path.
"""
import argparse
import os.path as osp
import sys

from mmengine.config import ConfigDict

import mmdet_detrx  # noqa: F401  (registers our modules)
from mmdet_detrx.utils import check_dataset_files
from mmdet_detrx.utils.tool_cli import (add_runner_args, load_tool_config, parse_tool_args,
                                        require_checkpoint_match, tool_runner)


def parse_args(argv=None):
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
    parser.add_argument('--amp', action='store_true',
                        help="mixed-precision inference: mmengine's TestLoop autocast (bf16 on "
                        'CPU, fp16 on CUDA); the ...X detectors return float32 predictions')
    add_runner_args(parser, partial_load_help='evaluate a checkpoint')
    return parse_tool_args(parser, argv)


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


def main(argv=None):
    args = parse_args(argv)
    if not osp.isfile(args.checkpoint) and '://' not in args.checkpoint:
        raise FileNotFoundError(f'checkpoint not found: {args.checkpoint}')
    if args.out is not None and not args.out.endswith(('.pkl', '.pickle')):
        raise ValueError(f'--out must be a .pkl/.pickle file, got {args.out}')

    cfg = load_tool_config(args)
    cfg.load_from = args.checkpoint

    if args.show or args.show_dir:
        cfg = trigger_visualization_hook(cfg, args)
    if args.tta:
        cfg = use_tta(cfg)
    if args.amp:
        cfg.test_cfg = ConfigDict(cfg.get('test_cfg') or dict(type='TestLoop'), fp16=True)
    require_checkpoint_match(cfg, args.allow_partial_load)
    check_dataset_files(cfg, ('test_dataloader', ))
    with tool_runner(cfg, args.launcher) as runner:
        if args.out is not None:
            from mmdet.evaluation import DumpDetResults
            runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=args.out))
        runner.test()


if __name__ == '__main__':
    sys.exit(main())
