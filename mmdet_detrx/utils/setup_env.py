"""Start-up checks and settings shared by ``tools/train.py`` and ``tools/test.py``."""
import contextlib
import os
import os.path as osp
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from mmengine.config import Config

# Datasets that create their own files on first use.
_SELF_GENERATING = {'SyntheticShapesDataset'}
# Datasets whose folder is checked against the config here (images, classes): the same check
# as when the dataset is built, but before the runner writes its work dir.
_COCO_FOLDER = {'CocoFolderDataset'}


def _dataset_cfgs(dataset_cfg: dict):
    """Yield leaf dataset configs (unwrapping RepeatDataset / ConcatDataset wrappers)."""
    if 'datasets' in dataset_cfg:
        for sub in dataset_cfg['datasets']:
            yield from _dataset_cfgs(sub)
    elif 'dataset' in dataset_cfg:
        yield from _dataset_cfgs(dataset_cfg['dataset'])
    else:
        yield dataset_cfg


def check_dataset_files(cfg: Config, loaders: Iterable[str]) -> None:
    """Fail early, saying where the data must be, if a dataloader's annotation file is missing.

    Without this, a COCO config on a machine without COCO dies deep inside pycocotools. Also
    checks, before a runner or work dir exists, that each dataset's classes and the heads'
    ``num_classes`` agree (``NumClassesCheckHook``'s check, on the config) and that a
    ``CocoFolderDataset`` folder fits its classes and has every image.
    """
    from mmdet_detrx.engine.hooks.num_classes_check_hook import check_num_classes_cfg
    check_num_classes_cfg(cfg, loaders)
    for loader in loaders:
        loader_cfg = cfg.get(loader)
        if not loader_cfg:
            continue
        for dataset_cfg in _dataset_cfgs(loader_cfg['dataset']):
            if dataset_cfg.get('type') in _SELF_GENERATING or not dataset_cfg.get('ann_file'):
                continue
            data_root = dataset_cfg.get('data_root') or ''
            ann_file = osp.join(data_root, dataset_cfg['ann_file'])
            if not osp.exists(ann_file):
                raise FileNotFoundError(
                    f'{loader}: annotation file {ann_file!r} not found. Put the dataset under '
                    f'{data_root or "the configured data_root"!r} (for COCO 2017: '
                    'annotations/instances_{train,val}2017.json, train2017/, val2017/), or '
                    f'point the config at it with --cfg-options {loader}.dataset.data_root=PATH')
            if dataset_cfg.get('type') in _COCO_FOLDER:
                _check_coco_folder_cfg(dataset_cfg, ann_file, loader)


def _check_coco_folder_cfg(dataset_cfg: dict, ann_file: str, loader: str) -> None:
    import json

    from mmdet_detrx.datasets.coco_folder import check_coco_folder
    if dataset_cfg.get('backend_args'):
        return  # the dataset checks what it can when it is built
    with open(ann_file) as f:
        coco = json.load(f)
    img_dir = osp.join(dataset_cfg.get('data_root') or '',
                       (dataset_cfg.get('data_prefix') or {}).get('img', ''))
    check_coco_folder(coco, ann_file, (dataset_cfg.get('metainfo') or {}).get('classes'),
                      img_dir, loader=loader)


def setup_cpu_distributed(cfg: Config, launcher: str) -> None:
    """Make mmengine's DDP work on CPU-only machines (gloo, no CUDA device ids).

    mmengine's ``init_dist`` calls ``torch.cuda.set_device`` and its DDP wrapper passes
    ``device_ids``; both are GPU-only. When no GPU is present we start the gloo process group
    ourselves (mmengine then skips its own init) and wrap the model without device ids.
    """
    if launcher == 'none' or torch.cuda.is_available() or dist.is_initialized():
        return
    if launcher != 'pytorch':
        raise RuntimeError(f'launcher={launcher!r} on a machine without GPUs: use '
                           '--launcher pytorch (torchrun) for CPU data-parallel runs')
    dist.init_process_group(backend='gloo', rank=int(os.environ['RANK']),
                            world_size=int(os.environ['WORLD_SIZE']))
    wrapper = cfg.get('model_wrapper_cfg') or dict(type='MMDistributedDataParallel')
    wrapper.setdefault('device_ids', None)
    cfg.model_wrapper_cfg = wrapper


@contextlib.contextmanager
def distributed_teardown() -> Iterator[None]:
    """Destroy the default process group when the block ends, however it ends.

    A process that exits with a live gloo group can abort in interpreter finalisation
    ("terminate called without an active exception", SIGABRT) while gloo's worker threads still
    hold tensors; torchrun then reports the whole run as failed although training finished.
    mmengine never destroys the group, so the tools do it while Python is still fully alive.
    After a normal end the ranks first meet in a barrier: a rank that tore its group down while
    a peer was still finishing its last collective closed the peer's connections under it, which
    aborted the peer the same way (seen once in a 2-process CPU test run).
    """
    completed = False
    try:
        yield
        completed = True
    finally:
        if dist.is_available() and dist.is_initialized():
            if completed:
                dist.barrier()
            dist.destroy_process_group()
