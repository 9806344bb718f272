"""Tiny random-init HF transformers DETRs, built offline from their config classes, and the
batches both code bases run on (converter parity tests, tests/test_converters/).

Every weight, buffer and norm parameter is perturbed after HF's init, so a converter that swaps
two LayerNorms (both initialised to 1 / 0) or forgets a bias fails the parity test instead of
passing by symmetry.
"""
import json
import os
import os.path as osp

import pytest
import torch

os.environ.setdefault('HF_HUB_OFFLINE', '1')
transformers = pytest.importorskip('transformers')

from mmdet.structures import DetDataSample  # noqa: E402

from mmdet_detrx.converters import convert  # noqa: E402
from mmdet_detrx.converters._convert import build_model_from_config  # noqa: E402

# HF image processor statistics (0-1 scale), deliberately not ImageNet's: the written config's
# data_preprocessor must carry the source's.
IMAGE_MEAN, IMAGE_STD = [0.5, 0.45, 0.4], [0.25, 0.2, 0.3]


def has_timm() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def tiny_resnet(out_features=('stage4', ), basic=False):
    """An HF ResNet with ResNet-50's (or -18's) block counts and 1/8 of its widths."""
    from transformers import ResNetConfig
    if basic:
        return ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[2, 2, 2, 2],
                            layer_type='basic', out_features=list(out_features))
    return ResNetConfig(embedding_size=8, hidden_sizes=[32, 64, 128, 256], depths=[3, 4, 6, 3],
                        layer_type='bottleneck', out_features=list(out_features))


def timm_backbone(name='resnet18', out_indices=(1, 2, 3, 4), output_stride=None):
    from transformers import TimmBackboneConfig
    return TimmBackboneConfig(backbone=name, out_indices=list(out_indices),
                              output_stride=output_stride, features_only=True)


def perturb(model, seed=0):
    """Move every floating tensor off its init value (running variances stay positive)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=g)
            if name.endswith('running_var'):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=g))
            else:
                tensor.add_(0.05 * noise)
    return model.eval()


def build_hf(kind: str, **overrides):
    """A tiny ``*ForObjectDetection``: kind is 'detr', 'conditional_detr' or 'deformable_detr'."""
    from transformers import (ConditionalDetrConfig, ConditionalDetrForObjectDetection,
                              DeformableDetrConfig, DeformableDetrForObjectDetection, DetrConfig,
                              DetrForObjectDetection)
    common = dict(encoder_layers=2, decoder_layers=2, encoder_ffn_dim=48, decoder_ffn_dim=40,
                  num_queries=12, id2label={i: f'thing{i}' for i in range(5)},
                  label2id={f'thing{i}': i for i in range(5)})
    if kind == 'detr':
        params = dict(common, d_model=32, encoder_attention_heads=4, decoder_attention_heads=2,
                      backbone_config=tiny_resnet())
        config_cls, cls = DetrConfig, DetrForObjectDetection
    elif kind == 'conditional_detr':
        params = dict(common, d_model=256, encoder_attention_heads=8, decoder_attention_heads=4,
                      backbone_config=tiny_resnet())
        config_cls, cls = ConditionalDetrConfig, ConditionalDetrForObjectDetection
    else:
        params = dict(common, d_model=256, encoder_attention_heads=8, decoder_attention_heads=4,
                      encoder_n_points=2, decoder_n_points=3, two_stage_num_proposals=15,
                      backbone_config=tiny_resnet(('stage2', 'stage3', 'stage4')))
        config_cls, cls = DeformableDetrConfig, DeformableDetrForObjectDetection
    config = config_cls(**dict(params, **overrides))
    torch.manual_seed(0)
    return perturb(cls(config))


def save_hf(model, folder: str) -> str:
    model.save_pretrained(folder)
    with open(osp.join(folder, 'preprocessor_config.json'), 'w') as f:
        json.dump(dict(image_processor_type='DetrImageProcessor', do_rescale=True,
                       rescale_factor=1 / 255, do_normalize=True, image_mean=IMAGE_MEAN,
                       image_std=IMAGE_STD), f)
    return folder


def convert_and_build(model, tmp_path, **convert_kwargs):
    """Save ``model``, convert the folder, build ours from the written config and load the
    written checkpoint strictly. Returns (our model, config path, checkpoint path)."""
    from mmengine.runner import load_checkpoint
    folder = save_hf(model, str(tmp_path / 'hf'))
    config_path, checkpoint_path = convert(folder, str(tmp_path / 'out'), **convert_kwargs)
    ours, _ = build_model_from_config(config_path)
    load_checkpoint(ours, checkpoint_path, map_location='cpu', strict=True)
    return ours.eval(), config_path, checkpoint_path


def batch(image_shapes, seed=0):
    """A normalised batch, zero-padded bottom-right to the largest size, as both code bases pad:
    (pixel_values, HF pixel_mask, mmdet data samples)."""
    g = torch.Generator().manual_seed(seed)
    height = max(h for h, _ in image_shapes)
    width = max(w for _, w in image_shapes)
    pixels = torch.zeros(len(image_shapes), 3, height, width)
    mask = torch.zeros(len(image_shapes), height, width, dtype=torch.long)
    samples = []
    for i, (h, w) in enumerate(image_shapes):
        pixels[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
        mask[i, :h, :w] = 1
        sample = DetDataSample()
        sample.set_metainfo(dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(height, width),
                                 batch_input_shape=(height, width), scale_factor=(1.0, 1.0)))
        samples.append(sample)
    return pixels, mask, samples


@torch.no_grad()
def last_layer_outputs(ours, hf, image_shapes, seed=0):
    """((our logits, our boxes), (HF logits, HF boxes)) of the last decoder layer."""
    pixels, mask, samples = batch(image_shapes, seed)
    cls_scores, bbox_preds = ours(pixels, samples, mode='tensor')[:2]
    out = hf(pixel_values=pixels, pixel_mask=mask)
    return (cls_scores[-1], bbox_preds[-1]), (out.logits, out.pred_boxes)


# a non-square image, and two images of different sizes (padding masks)
IMAGE_SHAPES = [[(96, 160)], [(96, 128), (64, 160)]]


def assert_parity(ours, hf, atol=1e-4, seed=0):
    for shapes in IMAGE_SHAPES:
        (logits, boxes), (hf_logits, hf_boxes) = last_layer_outputs(ours, hf, shapes, seed)
        assert logits.shape == hf_logits.shape and boxes.shape == hf_boxes.shape
        torch.testing.assert_close(logits, hf_logits, atol=atol, rtol=0)
        torch.testing.assert_close(boxes, hf_boxes, atol=atol, rtol=0)
