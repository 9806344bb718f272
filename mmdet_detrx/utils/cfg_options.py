"""``--cfg-options`` for our tools: typos fail, and ``data_root=X`` moves the whole dataset.

mmengine's ``Config.merge_from_dict`` (what mmdet's ``tools/train.py``/``test.py`` call) accepts
any key: ``--cfg-options trian_cfg.max_iters=2`` adds an unused ``trian_cfg`` and the full
schedule runs; ``--cfg-options data_root=X`` only changes the top-level variable, which the
dataloaders and evaluators copied when the config was parsed. :func:`merge_cfg_options` refuses
an unknown top-level key (listing close names) and, for ``data_root``, moves every path under
the old root in the dataloaders and evaluators with it.
"""
import difflib
import inspect
from typing import Any, Dict, Iterable

from mmengine.config import Config
from mmengine.runner import Runner

__all__ = ['check_cfg_option_keys', 'merge_cfg_options', 'rebase_data_root']

# Top-level keys read by mmengine's runners and mmdet's tools although configs may omit them.
_RUNNER_KEYS = {
    'model_wrapper_cfg', 'find_unused_parameters', 'sync_bn', 'compile', 'runner_type',
    'custom_imports', 'efficient_conv_bn_eval', 'activation_checkpointing', 'strategy',
    'tta_model', 'tta_pipeline', 'work_dir', 'launcher', 'default_scope'
}


def _known_top_level_keys(cfg: Config) -> set:
    known = set(cfg.keys()) | _RUNNER_KEYS
    known |= set(inspect.signature(Runner.__init__).parameters) - {'self', 'cfg'}
    runner_type = cfg.get('runner_type')
    if isinstance(runner_type, str):
        from mmengine.registry import RUNNERS
        runner_cls = RUNNERS.get(runner_type)
        if runner_cls is not None:
            known |= set(inspect.signature(runner_cls.__init__).parameters)
    return known


def check_cfg_option_keys(cfg: Config, options: Dict[str, Any]) -> None:
    """Raise ``KeyError`` naming each ``--cfg-options`` key whose top level the config lacks."""
    known = _known_top_level_keys(cfg)
    problems = []
    for key in options:
        top = key.split('.', 1)[0]
        if top in known:
            continue
        close = difflib.get_close_matches(top, sorted(known), n=3, cutoff=0.6)
        hint = f' (did you mean {", ".join(close)}?)' if close else ''
        problems.append(f'{key!r}: the config has no top-level key {top!r}{hint}')
    if problems:
        raise KeyError('unknown --cfg-options key(s), nothing in the config or the runner reads '
                       'them: ' + '; '.join(problems))


def _rebase(value, old: str, new: str, seen: set):
    if isinstance(value, (dict, list)):
        if id(value) in seen:  # one object reachable twice (test_dataloader = val_dataloader)
            return value
        seen.add(id(value))
    if isinstance(value, str):
        root = old.rstrip('/')
        if value == old or value == root:
            return new
        # only paths under the root: not 'data/coco_panoptic/...' for the root 'data/coco'
        if root and value.startswith(root + '/'):
            return new.rstrip('/') + value[len(root):]
        return value
    if isinstance(value, dict):
        for key in list(value.keys()):
            value[key] = _rebase(value[key], old, new, seen)
        return value
    if isinstance(value, (list, tuple)):
        rebased = [_rebase(item, old, new, seen) for item in value]
        return type(value)(rebased) if isinstance(value, tuple) else rebased
    return value


def rebase_data_root(cfg: Config, old: str, new: str,
                     sections: Iterable[str] = None) -> None:
    """Replace the ``old`` data root by ``new`` in every path of the data sections.

    ``sections`` default to the config's ``*_dataloader`` and ``*_evaluator`` keys (datasets'
    ``data_root``, CocoMetric's ``ann_file``, ...). Only ``old`` itself and paths under it
    (``old/...``) move: a sibling that merely shares the prefix (``data/coco_panoptic`` for the
    root ``data/coco``) is left alone.
    """
    if not old:
        return
    if old.endswith('/') and not new.endswith('/'):
        new += '/'
    if sections is None:
        sections = [key for key in cfg.keys() if key.endswith(('_dataloader', '_evaluator'))]
    seen = set()
    for section in sections:
        if section in cfg and cfg[section] is not None:
            cfg[section] = _rebase(cfg[section], old, new, seen)


def merge_cfg_options(cfg: Config, options: Dict[str, Any]) -> None:
    """``cfg.merge_from_dict(options)`` that refuses unknown keys and follows ``data_root``."""
    check_cfg_option_keys(cfg, options)
    old_root = cfg.get('data_root')
    new_root = options.get('data_root')
    if new_root is not None and not isinstance(old_root, str):
        raise KeyError('--cfg-options data_root=...: this config has no top-level data_root '
                       'string to move; set <loader>.dataset.data_root and the evaluators\' '
                       'ann_file instead')
    if new_root is not None and isinstance(new_root, str):
        # Move the data sections first, so that an explicit per-loader option still wins.
        rebase_data_root(cfg, old_root, new_root)
    cfg.merge_from_dict(options)
