"""Fine-tuning to another class set: exactly the class-dependent parameters of each head are
re-initialised, everything else loads strictly, one log line says so; anything else is refused.

Models are the repository's configs shrunk (ResNet-18, one or two layers) and built twice, with
3 classes (the checkpoint) and 2 (the model being fine-tuned).
"""
import functools
import os.path as osp
import types

import pytest
import torch
from _helpers import REPO_CONFIGS
from _helpers.detectors import shrink_deformable_detr, tiny_detr_cfg
from mmdet.registry import HOOKS, MODELS
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.runner import BaseLoop

import mmdet_detrx  # noqa: F401
from mmdet_detrx.engine.hooks import checkpoint_match_hook
from mmdet_detrx.engine.hooks.checkpoint_match_hook import CheckpointMismatchError
from mmdet_detrx.models.class_dependent import (AUX_HEAD_CLASS_DEPENDENT_PARAMS,
                                                CLASS_DEPENDENT_PARAMS, class_dependent_keys)

init_default_scope('mmdet')
DEMO_CONFIG = 'dinox-aux_r18-w32_1xb8-1000i_synthetic-shapes.py'


def _detr(num_classes):
    return tiny_detr_cfg(num_layers=1, num_classes=num_classes)


def _mtkd(num_classes):
    cfg = tiny_detr_cfg(num_layers=1, num_classes=num_classes)
    cfg.type = 'MTKDDETR'
    cfg.encoder.layer_cfg.self_attn_cfg.update(type='AdaptiveClusteringAttention', num_hashes=4)
    return cfg


def _conditional_detr(num_classes):
    cfg = Config.fromfile(osp.join(REPO_CONFIGS, 'conditional_detr',
                                   'conditional-detrx_r18-dc5_1xb8-3000i_synthetic-shapes.py')).model
    cfg.backbone.init_cfg = None
    cfg.encoder.num_layers = cfg.decoder.num_layers = 1
    cfg.bbox_head.num_classes = num_classes
    return cfg


def _demo_dinox_aux(num_classes):
    cfg = Config.fromfile(osp.join(REPO_CONFIGS, 'demo', DEMO_CONFIG)).model
    cfg.encoder.num_layers = cfg.decoder.num_layers = 2
    cfg.bbox_head.num_classes = cfg.aux_head.num_classes = num_classes
    return cfg


def _deformable(config, num_layers=2):
    def make(num_classes):
        cfg = shrink_deformable_detr(Config.fromfile(osp.join(REPO_CONFIGS, config)).model,
                                     num_layers, num_queries=10)
        cfg.bbox_head.num_classes = num_classes
        if 'dn_cfg' in cfg:
            cfg.dn_cfg.group_cfg.num_dn_queries = 10
        return cfg
    return make


_CLS = [f'bbox_head.cls_branches.{i}.{p}' for i in range(3) for p in ('weight', 'bias')]
CASES = {  # name: (config maker, the class-dependent keys expected)
    'detr': (_detr, ['bbox_head.fc_cls.weight', 'bbox_head.fc_cls.bias']),
    'conditional-detr': (_conditional_detr, ['bbox_head.fc_cls.weight', 'bbox_head.fc_cls.bias']),
    'mtkd': (_mtkd, ['bbox_head.fc_cls.weight', 'bbox_head.fc_cls.bias']),  # both branches
    'deformable-detr': (_deformable('deformable_detr/deformable-detrx_r50_16xb2-50e_coco.py'),
                        _CLS[:4]),  # one per decoder layer
    'deformable-detr-two-stage': (
        _deformable('deformable_detr/deformable-detrx-refine-twostage_r50_16xb2-50e_coco.py'),
        _CLS),  # + the encoder's proposal branch
    'dino': (_deformable('dino/dinox-4scale_r50_8xb2-12e_coco.py'),
             _CLS + ['dn_query_generator.label_embedding.weight']),
    'dinox-aux (demo)': (_demo_dinox_aux, _CLS + ['dn_query_generator.label_embedding.weight',
                                                  'aux_head.conv_cls.weight',
                                                  'aux_head.conv_cls.bias']),
}


@functools.lru_cache(maxsize=None)
def _build(case, num_classes, seed):
    torch.manual_seed(seed)
    model = MODELS.build(CASES[case][0](num_classes))
    model.init_weights()
    return model


class _TrainLoop(BaseLoop):

    def run(self):
        pass


def _runner(model, training=True, resume=False):
    loop = _TrainLoop.__new__(_TrainLoop) if training else None
    return types.SimpleNamespace(model=model, _train_loop=loop, _resume=resume)


def _logged(monkeypatch):
    lines = []
    monkeypatch.setattr(checkpoint_match_hook, 'print_log',
                        lambda message, logger=None: lines.append(message))
    return lines


@pytest.mark.parametrize('case', list(CASES))
def test_table_names_exactly_the_class_dependent_parameters(case):
    keys = class_dependent_keys(_build(case, 2, 0))
    assert sorted(keys) == sorted(CASES[case][1])
    # ...and they are exactly the parameters whose shape follows num_classes
    small, large = _build(case, 2, 0).state_dict(), _build(case, 3, 0).state_dict()
    assert sorted(k for k in small if small[k].shape != large[k].shape) == sorted(keys)


@pytest.mark.parametrize('case', list(CASES))
def test_fine_tuning_reinitialises_them_and_loads_the_rest(case, monkeypatch):
    source = _build(case, 3, 1)
    model = _build(case, 2, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint = {'state_dict': {f'module.{k}': v.clone()  # DDP prefix, as mmengine revises
                                 for k, v in source.state_dict().items()}}
    lines = _logged(monkeypatch)
    hook = HOOKS.build(dict(type='CheckpointMatchHook'))
    hook.after_load_checkpoint(_runner(model), checkpoint)
    assert len(lines) == 1 and 'from 3 to 2 classes' in lines[0]
    keys = CASES[case][1]
    assert all(key in lines[0] for key in keys)
    # what mmengine's loader does next: now strict, no size mismatch left
    model.load_state_dict({k[len('module.'):]: v for k, v in checkpoint['state_dict'].items()},
                          strict=True)
    for key, value in model.state_dict().items():
        expected = before[key] if key in keys else source.state_dict()[key]
        assert torch.equal(value, expected), key
    _build.cache_clear()  # the model was loaded into


@pytest.mark.parametrize('case', ['detr', 'dino'])
def test_class_change_refused_when_testing_or_resuming(case):
    checkpoint = {'state_dict': _build(case, 3, 1).state_dict()}
    hook = HOOKS.build(dict(type='CheckpointMatchHook'))
    for runner in (_runner(_build(case, 2, 2), training=False),
                   _runner(_build(case, 2, 2), resume=True)):
        with pytest.raises(CheckpointMismatchError,
                           match='the checkpoint has 3 classes and the model 2'):
            hook.after_load_checkpoint(runner, dict(checkpoint))
    _build.cache_clear()


def test_any_other_mismatch_is_still_refused(monkeypatch):
    lines = _logged(monkeypatch)
    hook = HOOKS.build(dict(type='CheckpointMatchHook'))
    source = _build('dino', 3, 1).state_dict()
    model = _build('dino', 2, 2)
    # a class change plus one other reshaped parameter
    reshaped = dict(source, **{'query_embedding.weight': torch.zeros(5, 256)})
    with pytest.raises(CheckpointMismatchError, match='query_embedding.weight'):
        hook.after_load_checkpoint(_runner(model), {'state_dict': reshaped})
    # a class change with a key missing
    partial = {k: v for k, v in source.items() if k != 'bbox_head.reg_branches.0.0.weight'}
    with pytest.raises(CheckpointMismatchError, match='1 missing keys'):
        hook.after_load_checkpoint(_runner(model), {'state_dict': partial})
    # only some of the class-dependent parameters differ (a mangled checkpoint)
    mangled = dict(_build('dino', 2, 1).state_dict(),
                   **{'bbox_head.cls_branches.0.weight': source['bbox_head.cls_branches.0.weight'],
                      'bbox_head.cls_branches.0.bias': source['bbox_head.cls_branches.0.bias']})
    with pytest.raises(CheckpointMismatchError, match='2 shape mismatches'):
        hook.after_load_checkpoint(_runner(model), {'state_dict': mangled})
    assert not lines
    _build.cache_clear()


def test_table_rows_are_head_types_of_mmdet():
    from mmdet.models import dense_heads
    assert all(hasattr(dense_heads, name) for name in CLASS_DEPENDENT_PARAMS)
    assert all(hasattr(dense_heads, name) for name in AUX_HEAD_CLASS_DEPENDENT_PARAMS)
