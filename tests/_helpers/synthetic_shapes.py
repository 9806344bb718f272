"""Command-line options that shrink an embedded-dataset config to a seconds-long run."""
TINY_SPEC = dict(seed=1, num_train=16, num_val=4, image_size='(96,96)', max_objects=3)
LOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')


def tiny_run_options(max_iters, ckpt_interval=1, extra=()):
    """``['--cfg-options', ...]`` for tools/train.py / test.py (ours or mmdet's): a 16-image
    dataset of 96x96 images, batch 2 in the main process, ``max_iters`` iterations, no
    validation during training, a checkpoint every ``ckpt_interval`` iterations, a log line per
    iteration; ``extra`` options are appended."""
    return ['--cfg-options', *[
        f'{loader}.dataset.spec.{key}={value}' for loader in LOADERS
        for key, value in TINY_SPEC.items()
    ], *[
        f'{loader}.{key}' for loader in LOADERS
        for key in ('batch_size=2', 'num_workers=0', 'persistent_workers=False')
    ], f'train_cfg.max_iters={max_iters}', 'train_cfg.val_interval=1000',
        f'default_hooks.checkpoint.interval={ckpt_interval}', 'default_hooks.logger.interval=1',
        *extra]
