"""DINOXAux (the demo's detector): DINOX plus a dense auxiliary head trained on the encoder output.

Its auxiliary losses join DINO's under an ``aux_`` prefix and train the backbone and encoder; at
inference it is exactly DINOX (the auxiliary head does not run). DINOX itself now builds at
128 dims on mmdet 3.3, whose DINO decoder sizes ``ref_point_head`` for 256 dims only.
"""
import copy
import os.path as osp

import pytest
import torch
from _helpers import REPO_CONFIGS
from _helpers.detectors import build_detector, demo_batch
from mmdet.registry import MODELS
from mmengine.config import Config
from mmengine.registry import init_default_scope

import mmdet_detrx  # noqa: F401

init_default_scope('mmdet')
DEMO = osp.join(REPO_CONFIGS, 'demo', 'dinox-aux_r18-w32_1xb8-1000i_synthetic-shapes.py')


def _cfg(num_layers=1):
    cfg = copy.deepcopy(Config.fromfile(DEMO).model)
    cfg.encoder.num_layers = cfg.decoder.num_layers = num_layers
    cfg.num_queries = 10
    cfg.dn_cfg.group_cfg.num_dn_queries = 10
    return cfg


def test_aux_losses_join_dinos_and_reach_backbone_and_encoder():
    model = build_detector(_cfg())
    model.train()
    inputs, samples = demo_batch(model, [(3, 96, 128), (3, 80, 112)], num_items=[3, 2], num_classes=3)
    losses = model.loss(inputs, samples)
    aux = {k for k in losses if k.startswith('aux_')}
    assert aux == {'aux_loss_cls', 'aux_loss_bbox', 'aux_loss_centerness'}
    assert {'loss_cls', 'enc_loss_cls', 'dn_loss_cls'} <= set(losses)
    assert model._aux_memory is None  # the encoder output is not kept past the step
    # the auxiliary losses alone train the encoder and the backbone
    sum(losses[k] for k in aux).backward()
    assert model.aux_head.conv_cls.weight.grad.abs().sum() > 0
    assert model.encoder.layers[0].self_attn.value_proj.weight.grad.abs().sum() > 0
    assert model.backbone.conv1.weight.grad.abs().sum() > 0
    assert model.bbox_head.cls_branches[0].weight.grad is None  # not a DETR-head loss


def test_inference_is_dinox_exactly():
    """Same weights without the auxiliary head in DINOX: identical predictions."""
    model = build_detector(_cfg())
    cfg = _cfg()
    cfg.type = 'DINOX'
    cfg.pop('aux_head')
    plain = MODELS.build(cfg)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith('aux_head.')}
    plain.load_state_dict(state, strict=True)
    model.eval()
    plain.eval()
    inputs, samples = demo_batch(model, [(3, 96, 128)], num_items=[2], num_classes=3,
                                 training=False)
    with torch.no_grad():
        ours = model.predict(inputs, copy.deepcopy(samples))[0].pred_instances
        theirs = plain.predict(inputs, copy.deepcopy(samples))[0].pred_instances
    torch.testing.assert_close(ours.bboxes, theirs.bboxes, rtol=0, atol=0)
    torch.testing.assert_close(ours.scores, theirs.scores, rtol=0, atol=0)
    assert torch.equal(ours.labels, theirs.labels)


def test_needs_an_aux_head():
    cfg = _cfg()
    cfg.pop('aux_head')
    with pytest.raises(TypeError, match='aux_head'):
        MODELS.build(cfg)


@pytest.mark.parametrize('embed_dims', [128, 256])
def test_dinox_builds_its_reference_point_head_for_the_encoding_it_is_fed(embed_dims):
    """mmdet 3.3 feeds a 4 x 128 encoding whatever embed_dims (OneDL: 4 x embed_dims); the head's
    input width follows it, so DINOX runs at 128 dims (mmdet 3.3's DINO fails there)."""
    cfg = _cfg()
    cfg.type = 'DINOX'
    cfg.pop('aux_head')
    if embed_dims != 128:
        cfg.embed_dims = embed_dims  # not a key: rebuild the widths that depend on it
        cfg.neck.out_channels = embed_dims
        for coder in (cfg.encoder, cfg.decoder):
            for key in ('self_attn_cfg', 'cross_attn_cfg', 'ffn_cfg'):
                if key in coder.layer_cfg:
                    coder.layer_cfg[key].embed_dims = embed_dims
        cfg.pop('embed_dims')
        cfg.positional_encoding.num_feats = embed_dims // 2
        cfg.bbox_head.embed_dims = embed_dims
    model = build_detector(cfg)
    first = model.decoder.ref_point_head.layers[0]
    assert first.in_features in (4 * 128, 4 * embed_dims)  # mmdet 3.3's / OneDL's encoding
    assert first.out_features == embed_dims
    model.eval()
    inputs, samples = demo_batch(model, [(3, 64, 64)], num_items=[1], num_classes=3, training=False)
    with torch.no_grad():
        result = model.predict(inputs, samples)[0].pred_instances
    assert result.bboxes.shape == (cfg.test_cfg.max_per_img, 4)
    assert torch.isfinite(result.bboxes).all()
