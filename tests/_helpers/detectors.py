"""Tiny DETR-family model configs and batches: CPU tests that build a detector in seconds.

The configs are mmdet's (or ours) shrunk: ResNet-18 without pretrained weights, few layers,
few queries, and for plain DETR a 32-wide transformer without dropout.
"""
import os.path as osp

import mmdet
import torch
from mmdet.testing import demo_mm_inputs
from mmengine.config import Config

from . import REPO_CONFIGS

MMDET_CONFIGS = osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs')
TINY_DETR_DIMS = 32


def tiny_detr_cfg(num_layers: int = 2, num_queries: int = 10, num_classes: int = 3,
                  dims: int = TINY_DETR_DIMS):
    """mmdet's DETR-R50 model config shrunk to a few thousand transformer parameters."""
    cfg = Config.fromfile(osp.join(MMDET_CONFIGS, 'detr/detr_r50_8xb2-150e_coco.py')).model
    cfg.num_queries = num_queries
    cfg.backbone.update(depth=18, init_cfg=None)
    cfg.neck.update(in_channels=[512], out_channels=dims)
    for coder in (cfg.encoder, cfg.decoder):
        coder.num_layers = num_layers
        for key in ('self_attn_cfg', 'cross_attn_cfg'):
            if key in coder.layer_cfg:
                coder.layer_cfg[key].update(embed_dims=dims, num_heads=4, dropout=0.0)
        coder.layer_cfg.ffn_cfg.update(embed_dims=dims, feedforward_channels=2 * dims,
                                       ffn_drop=0.0)
    cfg.positional_encoding.num_feats = dims // 2
    cfg.bbox_head.update(embed_dims=dims, num_classes=num_classes)
    cfg.test_cfg.max_per_img = num_queries
    return cfg


def shrink_deformable_detr(model_cfg, num_layers: int, num_queries: int):
    """Shrink a Deformable DETR / DINO model config in place (ResNet-18, few layers/queries).

    The backbone keeps upstream's ``out_indices`` (1, 2, 3), so the neck gets ResNet-18's
    widths of those stages.
    """
    model_cfg.backbone.update(depth=18, init_cfg=None)
    model_cfg.neck.in_channels = [128, 256, 512]
    model_cfg.encoder.num_layers = num_layers
    model_cfg.decoder.num_layers = num_layers
    model_cfg.num_queries = num_queries
    return model_cfg


def tiny_deformable_detrx_cfg(**kwargs):
    """Our Deformable DETR config's model shrunk to one layer and 10 queries, updated with
    ``kwargs`` (e.g. ``fold_frozen_bn=False``)."""
    path = osp.join(REPO_CONFIGS, 'deformable_detr/deformable-detrx_r50_16xb2-50e_coco.py')
    cfg = shrink_deformable_detr(Config.fromfile(path).model, num_layers=1, num_queries=10)
    cfg.update(kwargs)
    return cfg


def build_detector(cfg, seed: int = 0):
    """``MODELS.build(cfg)`` with its weights initialised from ``seed``."""
    from mmdet.registry import MODELS
    torch.manual_seed(seed)
    model = MODELS.build(cfg)
    model.init_weights()
    return model


def demo_batch(model, image_shapes, num_items, num_classes, training=True, seed=1):
    """``(inputs, data_samples)`` of mmdet's random demo images through ``model``'s
    data preprocessor (which pads the batch, so masks are exercised)."""
    torch.manual_seed(seed)
    data = demo_mm_inputs(batch_size=len(image_shapes), image_shapes=image_shapes,
                          num_items=num_items, num_classes=num_classes)
    data = model.data_preprocessor(data, training)
    return data['inputs'], data['data_samples']


def assert_same_predictions(actual, expected):
    """Two ``predict`` results (lists of ``DetDataSample``) equal up to float rounding: scores
    within 1e-4, boxes (pixels) within 1e-3, labels exactly."""
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a.pred_instances.scores, e.pred_instances.scores,
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.pred_instances.bboxes, e.pred_instances.bboxes,
                                   rtol=1e-4, atol=1e-3)
        assert torch.equal(a.pred_instances.labels, e.pred_instances.labels)
