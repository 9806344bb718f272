"""facebookresearch/detr ``.pth`` -> DETRX: equal outputs to the reference.

The reference is a tiny random-init HF ``DetrForObjectDetection`` with a timm ResNet (torchvision
names, as the original's backbone). Its weights, renamed to the original layout with the renames
HF's conversion script documents (``_helpers.original_detrs``), are saved as the training script
saves them (``{'model': ..., 'args': Namespace}``), converted by ``convert`` with the layout
detected, and our model must give HF's last-layer logits and boxes within 1e-4 on a non-square
image and a padded batch of two sizes.
"""
import pytest
import torch
from _helpers.hf_detrs import assert_parity, build_hf, has_timm, timm_backbone
from _helpers.original_detrs import hf_to_official_detr, save_official
from mmengine.config import Config
from mmengine.runner import load_checkpoint

from mmdet_detrx.converters import ConversionError, convert_source
from mmdet_detrx.converters._convert import build_model_from_config
from mmdet_detrx.converters._original_common import coco91_classes

pytestmark = pytest.mark.skipif(not has_timm(), reason='the reference uses a timm ResNet')


def _hf_detr(**overrides):
    kwargs = dict(backbone_config=timm_backbone('resnet18'), encoder_layers=2,
                  decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4)
    kwargs.update(overrides)
    return build_hf('detr', **kwargs)


def _convert_and_build(path, tmp_path, **kwargs):
    result = convert_source(path, str(tmp_path / 'out'), **kwargs)
    ours, _ = build_model_from_config(result.config_path)
    load_checkpoint(ours, result.checkpoint_path, map_location='cpu', strict=True)
    return ours.eval(), result


def test_detr_official_equals_reference(tmp_path):
    hf = _hf_detr()
    path = save_official(tmp_path / 'checkpoint.pth', hf_to_official_detr(hf.state_dict()),
                         nheads=4, dilation=False, dropout=0.1, hidden_dim=32)
    ours, result = _convert_and_build(path, tmp_path)
    assert result.layout == 'detr-official'
    assert type(ours).__name__ == 'DETRX'
    assert_parity(ours, hf)
    cfg = Config.fromfile(result.config_path)
    assert "_base_ = 'mmdet::detr/detr_r50_8xb2-150e_coco.py'" in open(result.config_path).read()
    assert cfg.model.num_queries == 12 and cfg.model.bbox_head.num_classes == 5
    assert cfg.model.backbone.type == 'ResNet' and cfg.model.backbone.depth == 18
    assert cfg.model.encoder.layer_cfg.self_attn_cfg.num_heads == 4
    assert any('args.dilation' in note for note in result.notes)


def test_detr_dc5_from_file_name_and_when_named(tmp_path):
    """R50 and R50-DC5 weights have the same shapes: 'dc5' in the name, or --from."""
    hf = _hf_detr(backbone_config=timm_backbone('resnet50', output_stride=16),
                  encoder_layers=1, decoder_layers=1, encoder_attention_heads=8,
                  decoder_attention_heads=8)
    weights = hf_to_official_detr(hf.state_dict())
    dc5 = save_official(tmp_path / 'detr-r50-dc5-f0fb7ef5.pth', weights)  # no args: hub file
    ours, result = _convert_and_build(dc5, tmp_path / 'a')
    cfg = Config.fromfile(result.config_path)
    assert cfg.model.backbone.type == 'TorchvisionResNet'
    assert cfg.model.backbone.dilations == (1, 1, 1, 2) and cfg.model.backbone.depth == 50
    assert any('nheads' in note for note in result.notes)  # 8 assumed, noted
    assert_parity(ours, hf)

    plain = save_official(tmp_path / 'detr-r50.pth', weights)
    _, result = _convert_and_build(plain, tmp_path / 'b')
    assert result.layout == 'detr-official'
    assert Config.fromfile(result.config_path).model.backbone.type == 'ResNet'
    assert any('detr-official-dc5' in note for note in result.notes)
    ours, result = _convert_and_build(plain, tmp_path / 'c', layout='detr-official-dc5')
    assert Config.fromfile(result.config_path).model.backbone.type == 'TorchvisionResNet'
    assert_parity(ours, hf)


def test_detr_panoptic_checkpoint_converts_its_detector(tmp_path):
    hf = _hf_detr(encoder_layers=1, decoder_layers=1)
    weights = {f'detr.{k}': v for k, v in hf_to_official_detr(hf.state_dict()).items()}
    weights['bbox_attention.q_linear.weight'] = torch.zeros(32, 32)
    weights['mask_head.lay1.weight'] = torch.zeros(8, 40, 3, 3)
    path = save_official(tmp_path / 'panoptic.pth', weights, nheads=4)
    ours, result = _convert_and_build(path, tmp_path)
    assert result.layout == 'detr-official'
    assert any('bbox_attention, mask_head' in note for note in result.notes)
    assert_parity(ours, hf)


def test_detr_coco_category_ids(tmp_path):
    """91 outputs (COCO ids + no-object) keep their order; the names say which id is which."""
    hf = _hf_detr(encoder_layers=1, decoder_layers=1)
    torch.manual_seed(1)
    hf.class_labels_classifier = torch.nn.Linear(32, 92)  # HF's logits: this layer's output
    path = save_official(tmp_path / 'coco.pth', hf_to_official_detr(hf.state_dict()), nheads=4)
    ours, result = _convert_and_build(path, tmp_path)
    assert list(result.classes) == coco91_classes()
    assert result.classes[1] == 'person' and result.classes[12] == 'N/A'
    assert_parity(ours, hf)


def test_detr_unsupported_options_are_named(tmp_path):
    hf = _hf_detr(encoder_layers=1, decoder_layers=1)
    weights = hf_to_official_detr(hf.state_dict())
    weights['transformer.encoder.norm.weight'] = torch.ones(32)
    weights['transformer.encoder.norm.bias'] = torch.zeros(32)
    path = save_official(tmp_path / 'prenorm.pth', weights, nheads=4)
    with pytest.raises(ConversionError, match='pre-norm'):
        convert_source(path, str(tmp_path / 'out'))
    assert not (tmp_path / 'out').exists()
