"""ACT and MTKD on converted HF weights (issue 24, item 3): the mission's usage on the
checkpoints users have. A random-init HF DETR is converted; ACT replaces its encoder attention
at the exact limit (HF's outputs) and at a width calibrated on the converted model's own
encoder inputs; MTKD takes the converted model as its exact (teacher) branch. The shipped ACT
config for facebook/detr-resnet-50 loads a converted DETR-R50 of that layout strictly."""
import copy
import os.path as osp

import torch
from _helpers import REPO_CONFIGS
from _helpers.hf_detrs import (IMAGE_SHAPES, batch, build_hf, convert_and_build,
                               last_layer_outputs, save_hf)
from mmdet.registry import MODELS
from mmengine.config import Config
from mmengine.runner import load_checkpoint

from mmdet_detrx.models.layers import (AdaptiveClusteringAttention, calibrate_bucket_width,
                                       layer_error)


def build_with(config_path, checkpoint_path, **model_changes):
    cfg = Config.fromfile(config_path).model
    for path, value in model_changes.items():
        node = cfg
        *parents, leaf = path.split('.')
        for part in parents:
            node = node[part]
        node[leaf].update(value)  # ACT takes the exact attention's arguments
    model = MODELS.build(cfg)
    load_checkpoint(model, checkpoint_path, map_location='cpu', strict=True)
    return model.eval()


ACT = 'encoder.layer_cfg.self_attn_cfg'


def act_cfg(bucket_width):
    return dict(type='AdaptiveClusteringAttention', num_hashes=8, bucket_width=bucket_width,
                seed=0)


@torch.no_grad()
def test_act_and_mtkd_on_a_converted_hf_detr(tmp_path):
    hf = build_hf('detr')
    exact, config_path, checkpoint_path = convert_and_build(hf, tmp_path)

    # ACT at its exact limit (every query its own cluster): HF's outputs
    limit = build_with(config_path, checkpoint_path, **{ACT: act_cfg(1e-6)})
    assert isinstance(limit.encoder.layers[0].self_attn, AdaptiveClusteringAttention)
    for shapes in IMAGE_SHAPES:
        (logits, boxes), (hf_logits, hf_boxes) = last_layer_outputs(limit, hf, shapes)
        torch.testing.assert_close(logits, hf_logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(boxes, hf_boxes, atol=1e-4, rtol=0)

    # a width calibrated on the converted model's encoder inputs (first layer; 80 and 54 tokens)
    pixels, _, samples = batch([(256, 320), (192, 288)], seed=1)
    seen = {}
    hook = exact.encoder.layers[0].self_attn.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    exact(pixels, samples, mode='tensor')
    hook.remove()
    calib = (seen['query'], seen['query_pos'], seen['key_padding_mask'])
    probe = build_with(config_path, checkpoint_path, **{ACT: act_cfg(1.0)})
    width = calibrate_bucket_width(probe.encoder.layers[0].self_attn, *calib, target_error=0.05)
    act = build_with(config_path, checkpoint_path, **{ACT: act_cfg(width)})
    error, clusters = layer_error(act.encoder.layers[0].self_attn, *calib)
    assert error < 0.05 and 1 <= clusters < 80  # queries share clusters: ACT, not exact
    cls_scores, bbox_preds = act(pixels, samples, mode='tensor')[:2]
    assert torch.isfinite(cls_scores).all() and torch.isfinite(bbox_preds).all()

    # MTKD with the converted model as the exact (teacher) branch: it loads strictly and its
    # full branch is the converted model, so HF's outputs
    mtkd_base = Config.fromfile(osp.join(REPO_CONFIGS, '_base_', 'mtkd.py')).mtkd_model
    cfg = Config.fromfile(config_path).model
    cfg.update(type='MTKDDETR', **copy.deepcopy(mtkd_base))
    cfg.encoder.layer_cfg.self_attn_cfg.update(act_cfg(width))
    cfg.test_branch = 'full'
    mtkd = MODELS.build(cfg)
    load_checkpoint(mtkd, checkpoint_path, map_location='cpu', strict=True)
    mtkd.eval()
    (logits, boxes), (hf_logits, hf_boxes) = last_layer_outputs(mtkd, hf, IMAGE_SHAPES[1])
    torch.testing.assert_close(logits, hf_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(boxes, hf_boxes, atol=1e-4, rtol=0)


def test_shipped_act_config_loads_a_converted_detr_resnet_50(tmp_path):
    """configs/act/act-detr_r50_hf-detr-resnet-50_coco.py takes a converted DETR-R50 of
    facebook/detr-resnet-50's shape (HF's DetrConfig defaults: d=256, 6+6 layers, 100 queries;
    91 COCO-id classes, --coco80) strictly. The backbone is HF's ResNet-50 (the same mmdet keys
    as the hub model's timm ResNet-50, and no timm needed)."""
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

    from mmdet_detrx.converters import convert
    coco91 = {i: f'class_{i}' for i in range(91)}
    hf = DetrForObjectDetection(DetrConfig(
        backbone_config=ResNetConfig(out_features=['stage4']), id2label=coco91,
        label2id={v: k for k, v in coco91.items()}))
    folder = save_hf(hf, str(tmp_path / 'detr-resnet-50'))
    _, checkpoint_path = convert(folder, str(tmp_path / 'out'), coco80=True)
    cfg = Config.fromfile(osp.join(REPO_CONFIGS, 'act', 'act-detr_r50_hf-detr-resnet-50_coco.py'))
    model = MODELS.build(cfg.model)
    load_checkpoint(model, checkpoint_path, map_location='cpu', strict=True)
    assert isinstance(model.encoder.layers[0].self_attn, AdaptiveClusteringAttention)
