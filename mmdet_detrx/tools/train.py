"""Train a detector: ``detrx-train CONFIG [--work-dir DIR] [--amp] [--resume [PATH]]``.

Also ``python -m mmdet_detrx.tools.train`` or, in a clone, ``python tools/train.py``.

Mirrors MMDetection's ``tools/train.py`` and registers mmdet-detrx's modules first. Beyond it:
unknown top-level ``--cfg-options`` keys fail and ``data_root=X`` moves every dataset path
(``merge_cfg_options``); checkpoints are written atomically (``atomic_local`` backend);
``--resume`` without a path skips a truncated latest checkpoint and follows a moved work dir;
``load_from`` must match the model (``CheckpointMatchHook``) unless ``--allow-partial-load``.
"""
import argparse
import os.path as osp
import sys

import mmdet_detrx  # noqa: F401  (registers our modules)
from mmdet_detrx.engine.optimizers import amp_optim_wrapper_cfg
from mmdet_detrx.utils import check_dataset_files, find_resumable_checkpoint, use_atomic_checkpoints
from mmdet_detrx.utils.tool_cli import (add_runner_args, load_tool_config, parse_tool_args,
                                        require_checkpoint_match, tool_runner)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a detector')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument('--amp', action='store_true', default=False,
                        help='automatic mixed precision (fp16 on GPU, bf16 on CPU)')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the learning rate by the actual batch size')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from PATH, or from the latest checkpoint in the work dir if no PATH')
    add_runner_args(parser, partial_load_help='load a load_from checkpoint')
    return parse_tool_args(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_tool_config(args)

    if args.amp:  # fp16 AmpOptimWrapper on an accelerator, bf16 CPUAmpOptimWrapper on CPU
        cfg.optim_wrapper = amp_optim_wrapper_cfg(cfg.optim_wrapper)

    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg or 'base_batch_size' not in cfg.auto_scale_lr:
            raise RuntimeError('--auto-scale-lr needs auto_scale_lr.base_batch_size in the config')
        cfg.auto_scale_lr.enable = True

    if args.resume == 'auto':
        # mmengine would take last_checkpoint as is: a truncated file or a path in the work
        # dir's old location fails. Resolve it here to the newest intact checkpoint.
        latest = find_resumable_checkpoint(cfg.work_dir) if osp.isdir(cfg.work_dir) else None
        cfg.resume = latest is not None
        if latest is not None:
            cfg.load_from = latest
        else:  # a first start of a restartable job: run as without --resume (config's load_from)
            print(f'--resume: no intact checkpoint in {cfg.work_dir}; starting a new run')
    elif args.resume is not None:
        if not osp.isfile(args.resume):
            raise FileNotFoundError(f'--resume checkpoint not found: {args.resume}')
        cfg.resume = True
        cfg.load_from = args.resume

    load_from = cfg.get('load_from')
    if load_from and '://' not in load_from and not osp.isfile(load_from):
        raise FileNotFoundError(f'load_from checkpoint not found: {load_from}')
    require_checkpoint_match(cfg, args.allow_partial_load)
    use_atomic_checkpoints(cfg)
    check_dataset_files(cfg, ('train_dataloader', 'val_dataloader'))
    with tool_runner(cfg, args.launcher) as runner:
        runner.train()


if __name__ == '__main__':
    sys.exit(main())
