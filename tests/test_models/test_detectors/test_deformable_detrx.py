"""Our Deformable DETR / DINO configs give mmdet's detectors, computed by MSDeformAttn.

Each of our configs is built next to the mmdet config it derives from, shrunk the same way
(ResNet-18, two encoder/decoder layers, few queries, small images) so a CPU run takes seconds.
With the same weights (strict loads both ways) predictions and losses must agree.
"""
import copy
import functools
import os.path as osp

import pytest
import torch
from _helpers import REPO_CONFIGS
from _helpers.detectors import MMDET_CONFIGS, demo_batch, shrink_deformable_detr
from mmcv.ops import MultiScaleDeformableAttention
from mmdet.registry import MODELS
from mmengine.config import Config
from mmengine.registry import init_default_scope

from mmdet_detrx.models.layers import MSDeformAttn

init_default_scope('mmdet')  # configs name mmdet's modules without a scope prefix

CASES = {
    'deformable-detr': ('deformable_detr/deformable-detrx_r50_16xb2-50e_coco.py',
                        'deformable_detr/deformable-detr_r50_16xb2-50e_coco.py'),
    'deformable-detr-refine-twostage': (
        'deformable_detr/deformable-detrx-refine-twostage_r50_16xb2-50e_coco.py',
        'deformable_detr/deformable-detr-refine-twostage_r50_16xb2-50e_coco.py'),
    'dino': ('dino/dinox-4scale_r50_8xb2-12e_coco.py', 'dino/dino-4scale_r50_8xb2-12e_coco.py'),
}
NUM_LAYERS = 2


def _small_model_cfg(path):
    cfg = shrink_deformable_detr(Config.fromfile(path).model, NUM_LAYERS, num_queries=30)
    if 'X' in cfg.type:
        # mmdet's NCHW convolutions and separate BN passes, so that the backbones agree bitwise
        # and these comparisons isolate the attention op: channels-last convolutions and folded
        # BNs round differently (~1e-6), which can flip the near-tied top-k proposals and
        # Hungarian matches of random-init models. The layout and the folding are tested in
        # test_channels_last.py and test_fold_frozen_bn.py.
        cfg.conv_memory_format = 'contiguous'
        cfg.fold_frozen_bn = False
    if 'dn_cfg' in cfg:
        cfg.dn_cfg.group_cfg.num_dn_queries = 20
    return cfg


@functools.lru_cache(maxsize=None)  # built once per case: building is half of the cost
def _build_pair(case):
    ours_cfg, mmdet_cfg = CASES[case]
    torch.manual_seed(0)  # the weights upstream's init draws
    ours = MODELS.build(_small_model_cfg(osp.join(REPO_CONFIGS, ours_cfg)))
    # mmdet allocates level_embed with torch.Tensor(...) and fills it only in init_weights:
    # without this call it holds whatever memory it got (NaN now and then, by test order).
    ours.init_weights()
    ref = MODELS.build(_small_model_cfg(osp.join(MMDET_CONFIGS, mmdet_cfg)))
    # Every parameter random (mmcv zero-initialises the sampling offsets and attention
    # weights, which would leave the sampling positions untested); no dropout.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in ours.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.02)
    for model in (ours, ref):
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    ref.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def _batch(model, training):
    return demo_batch(model, [(3, 48, 64), (3, 40, 56)], num_items=[3, 2], num_classes=80,
                      training=training)


@pytest.mark.parametrize('case', list(CASES))
def test_every_deformable_attention_is_ours(case):
    ours, ref = _build_pair(case)
    attns = [m for m in ours.modules() if isinstance(m, MultiScaleDeformableAttention)]
    assert len(attns) == 2 * NUM_LAYERS  # encoder self-attention + decoder cross-attention
    assert all(isinstance(m, MSDeformAttn) for m in attns)
    assert not any(isinstance(m, MSDeformAttn) for m in ref.modules())
    assert type(ours).__name__ == type(ref).__name__ + 'X'


@pytest.mark.parametrize('case', list(CASES))
def test_predictions_match_mmdet(case):
    ours, ref = _build_pair(case)
    ours.eval()
    ref.eval()
    inputs, samples = _batch(ref, training=False)
    with torch.no_grad():
        raw_ours = ours(inputs, copy.deepcopy(samples), mode='tensor')
        raw_ref = ref(inputs, copy.deepcopy(samples), mode='tensor')
        torch.testing.assert_close(raw_ours, raw_ref, atol=1e-4, rtol=1e-4)

        preds_ours = ours.predict(inputs, copy.deepcopy(samples))
        preds_ref = ref.predict(inputs, copy.deepcopy(samples))
    for pred_ours, pred_ref in zip(preds_ours, preds_ref):
        a, b = pred_ours.pred_instances, pred_ref.pred_instances
        assert len(a) == len(b) > 0
        torch.testing.assert_close(a.scores, b.scores, atol=1e-4, rtol=0)
        # Near-tied scores may swap places: match each detection to one with the same label,
        # score and box instead of comparing row by row.
        same = ((a.labels[:, None] == b.labels[None]) &
                ((a.scores[:, None] - b.scores[None]).abs() <= 1e-4) &
                ((a.bboxes[:, None] - b.bboxes[None]).abs().amax(-1) <= 1e-4))
        assert same.any(1).all() and same.any(0).all()


@pytest.mark.parametrize('case', list(CASES))
def test_losses_match_mmdet(case):
    ours, ref = _build_pair(case)
    ours.train()
    ref.train()
    ours.zero_grad()
    ref.zero_grad()
    inputs, samples = _batch(ref, training=True)
    losses = []
    for model in (ours, ref):
        torch.manual_seed(2)  # DINO's denoising queries are random: same draw for both
        losses.append(model.loss(inputs, copy.deepcopy(samples)))
    assert losses[0].keys() == losses[1].keys()
    for name in losses[0]:
        torch.testing.assert_close(losses[0][name], losses[1][name], atol=1e-4, rtol=1e-4,
                                   msg=lambda m, name=name: f'{name}: {m}')
    # Backward through our op gives mmdet's gradients.
    for model, model_losses in zip((ours, ref), losses):
        sum(v for k, v in model_losses.items() if 'loss' in k).backward()
    ours_attns = [m for m in ours.modules() if isinstance(m, MultiScaleDeformableAttention)]
    ref_attns = [m for m in ref.modules() if isinstance(m, MultiScaleDeformableAttention)]
    for attn, ref_attn in zip(ours_attns, ref_attns):
        for (name, param), ref_param in zip(attn.named_parameters(), ref_attn.parameters()):
            torch.testing.assert_close(param.grad, ref_param.grad, atol=1e-3, rtol=1e-3,
                                       msg=lambda m, name=name: f'{name}.grad: {m}')
    assert all(layer.cross_attn.sampling_offsets.weight.grad.abs().sum() > 0
               for layer in ours.decoder.layers)
