"""Stop a run whose dataset classes and head ``num_classes`` disagree, before anything runs.

A 2-class model on a dataset that still has 3 classes trains until the first label 2 reaches
the matching cost (``IndexError: index 2 is out of bounds for dimension 0 with size 2`` deep in
``match_cost.py``); the other way round it trains silently with a class that never occurs.
``NumClassesCheckHook`` compares ``len(dataset.metainfo['classes'])`` of every dataloader the
run uses with the ``num_classes`` of every head, at ``before_run`` (before the checkpoint is
loaded and before the first iteration), and raises :class:`NumClassesMismatchError` naming both
numbers and the config keys to change. mmdet's own ``NumClassCheckHook`` checks less (train and
val epochs only, by ``assert``) and names no key.

The embedded-dataset configs and the COCO-folder configs enable it for any tool, mmdet's own
included (``default_hooks.num_classes_check``); our tools also check the config before building
the runner (:func:`check_num_classes_cfg`, called by ``check_dataset_files``).
"""
from typing import Iterator, List, Optional, Sequence, Tuple

from mmdet.registry import DATASETS, HOOKS
from mmengine.hooks import Hook
from mmengine.model import BaseTTAModel, is_model_wrapper
from mmengine.runner import BaseLoop

__all__ = ['NumClassesCheckHook', 'NumClassesMismatchError', 'check_num_classes_cfg']

# Modules whose num_classes is not a config key of their own: mmdet's RPN is class-agnostic
# (num_classes=1), DINO's denoising query generator copies bbox_head.num_classes.
_NOT_A_HEAD = ('rpn_head', 'dn_query_generator')


class NumClassesMismatchError(ValueError):
    """The dataset's classes and a head's ``num_classes`` disagree (see the message)."""


def mismatch_message(loader: str, dataset_type: str, classes: Sequence[str], head_key: str,
                     num_classes: int) -> str:
    names = ', '.join(repr(name) for name in classes[:10])
    more = f', ... ({len(classes) - 10} more)' if len(classes) > 10 else ''
    return (f'{loader}: the dataset ({dataset_type}) has {len(classes)} classes ({names}{more}) '
            f'but {head_key} is {num_classes}. Make them agree before training or testing: set '
            f'{head_key}={len(classes)}, or the dataset classes with {loader}.dataset.metainfo='
            f'dict(classes=(...)) ({num_classes} names; and the same in the other dataloaders)')


def _head_num_classes(model) -> Iterator[Tuple[str, int]]:
    while is_model_wrapper(model) or isinstance(model, BaseTTAModel):
        model = model.module
    for name, module in model.named_modules():
        num_classes = getattr(module, 'num_classes', None)
        if (name and isinstance(num_classes, int) and 'head' in name
                and not name.endswith(_NOT_A_HEAD)):
            yield f'model.{name}.num_classes', num_classes


@HOOKS.register_module()
class NumClassesCheckHook(Hook):
    """Raise :class:`NumClassesMismatchError` before the run when a dataloader's dataset has
    another number of classes than a head's ``num_classes``."""

    priority = 'VERY_HIGH'

    def before_run(self, runner) -> None:
        # Runner.train/val/test build their loops (and dataloaders) before `before_run` and load
        # the checkpoint after it; loops not built yet are not part of this run.
        for loader, attribute in (('train_dataloader', '_train_loop'),
                                  ('val_dataloader', '_val_loop'),
                                  ('test_dataloader', '_test_loop')):
            loop = getattr(runner, attribute, None)
            if not isinstance(loop, BaseLoop):
                continue
            dataset = loop.dataloader.dataset
            classes = (getattr(dataset, 'metainfo', None) or {}).get('classes')
            if not classes or isinstance(classes, str):
                continue
            for head_key, num_classes in _head_num_classes(runner.model):
                if num_classes != len(classes):
                    raise NumClassesMismatchError(mismatch_message(
                        loader, type(dataset).__name__, list(classes), head_key, num_classes))


def _leaf_datasets(dataset_cfg: dict) -> Iterator[dict]:
    if 'datasets' in dataset_cfg:
        for sub in dataset_cfg['datasets']:
            yield from _leaf_datasets(sub)
    elif 'dataset' in dataset_cfg:
        yield from _leaf_datasets(dataset_cfg['dataset'])
    else:
        yield dataset_cfg


def _cfg_num_classes(node, path: str) -> Iterator[Tuple[str, int]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if (key == 'num_classes' and isinstance(value, int) and 'head' in path
                    and not path.endswith(_NOT_A_HEAD)):
                yield f'{path}.num_classes', value
            elif key not in ('train_cfg', 'test_cfg', 'data_preprocessor'):
                yield from _cfg_num_classes(value, f'{path}.{key}')
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            yield from _cfg_num_classes(value, f'{path}.{index}')


def _cfg_classes(dataset_cfg: dict) -> Optional[List[str]]:
    dataset_type = dataset_cfg.get('type')
    if not isinstance(dataset_type, str):
        return None
    dataset_class = DATASETS.get(dataset_type)
    if dataset_class is None or not hasattr(dataset_class, '_load_metainfo'):
        return None
    if getattr(dataset_class, 'classes_required', False) and not (
            dataset_cfg.get('metainfo') or {}).get('classes'):
        return None  # the dataset itself refuses, asking for them (CocoFolderDataset)
    try:
        classes = dataset_class._load_metainfo(dataset_cfg.get('metainfo')).get('classes')
    except Exception:  # a metainfo file that cannot be read here: the hook checks at run time
        return None
    return None if not classes or isinstance(classes, str) else list(classes)


def check_num_classes_cfg(cfg, loaders: Sequence[str]) -> None:
    """The hook's check on the config itself, before a runner (and its work dir) exists:
    dataset classes from each loader's dataset type and ``metainfo``, ``num_classes`` from the
    model config's heads."""
    model_cfg = cfg.get('model') or {}
    while 'module' in model_cfg and 'type' in model_cfg.get('module', {}):  # TTA wrapper
        model_cfg = model_cfg['module']
    heads = list(_cfg_num_classes(model_cfg, 'model'))
    if not heads:
        return
    for loader in loaders:
        loader_cfg = cfg.get(loader)
        if not loader_cfg or 'dataset' not in loader_cfg:
            continue
        for dataset_cfg in _leaf_datasets(loader_cfg['dataset']):
            classes = _cfg_classes(dataset_cfg)
            if classes is None:
                continue
            for head_key, num_classes in heads:
                if num_classes != len(classes):
                    raise NumClassesMismatchError(mismatch_message(
                        loader, dataset_cfg['type'], classes, head_key, num_classes))
