"""HF transformers DETR / Conditional DETR -> DETRX / ConditionalDETRX: equal outputs.

Tiny random-init HF models (every tensor perturbed off its init) are saved with
``save_pretrained``, converted by ``mmdet_detrx.converters.convert`` and compared on the same
normalised input: last decoder layer class logits and boxes within 1e-4, for a non-square image
and a padded batch of two sizes.
"""
import pytest
import torch
from _helpers.hf_detrs import (IMAGE_MEAN, IMAGE_SHAPES, IMAGE_STD, assert_parity, build_hf,
                               convert_and_build, has_timm, last_layer_outputs, timm_backbone)
from mmengine.config import Config

from mmdet_detrx.converters import get_layout, load_source
from mmdet_detrx.utils.safe_checkpoint import load_checkpoint_file


def test_detr_hf_resnet_backbone(tmp_path):
    hf = build_hf('detr')
    ours, config_path, checkpoint_path = convert_and_build(hf, tmp_path)
    assert type(ours).__name__ == 'DETRX'
    assert_parity(ours, hf)
    cfg = Config.fromfile(config_path)
    # class names, normalisation and hyper-parameters travel in the config ...
    assert cfg.metainfo.classes == tuple(f'thing{i}' for i in range(5))
    assert cfg.test_dataloader.dataset.metainfo.classes == cfg.metainfo.classes
    assert cfg.model.data_preprocessor.mean == pytest.approx([255 * m for m in IMAGE_MEAN])
    assert cfg.model.data_preprocessor.std == pytest.approx([255 * s for s in IMAGE_STD])
    assert cfg.model.data_preprocessor.bgr_to_rgb
    assert cfg.model.bbox_head.num_classes == 5 and cfg.model.num_queries == 12
    assert cfg.load_from == checkpoint_path
    # ... and the class names in the checkpoint's meta
    meta = load_checkpoint_file(checkpoint_path)['meta']
    assert meta['dataset_meta']['classes'] == cfg.metainfo.classes
    # the config shows only the diff on mmdet's DETR
    text = open(config_path).read()
    assert "_base_ = 'mmdet::detr/detr_r50_8xb2-150e_coco.py'" in text


def test_detr_data_preprocessor_normalises_as_hf(tmp_path):
    """The written data_preprocessor turns an 8-bit BGR image into HF's normalised RGB input."""
    hf = build_hf('detr', encoder_layers=1, decoder_layers=1)
    ours, _, _ = convert_and_build(hf, tmp_path)
    rgb = torch.randint(0, 256, (3, 32, 48), dtype=torch.uint8)
    data = ours.data_preprocessor(dict(inputs=[rgb.flip(0)], data_samples=None), False)
    expected = (rgb.float() / 255 - torch.tensor(IMAGE_MEAN)[:, None, None]) / torch.tensor(
        IMAGE_STD)[:, None, None]
    torch.testing.assert_close(data['inputs'][0], expected, atol=1e-5, rtol=0)


@pytest.mark.skipif(not has_timm(), reason='timm backbones need timm')
@pytest.mark.parametrize('name,output_stride', [('resnet18', None), ('resnet50', 16)])
def test_detr_timm_backbone_and_dc5(tmp_path, name, output_stride):
    hf = build_hf('detr', backbone_config=timm_backbone(name, output_stride=output_stride),
                  encoder_layers=1, decoder_layers=1)
    ours, config_path, _ = convert_and_build(hf, tmp_path)
    backbone = Config.fromfile(config_path).model.backbone
    if output_stride:  # DC5: torchvision/timm dilation, not mmdet's
        assert backbone.type == 'TorchvisionResNet' and backbone.dilations == (1, 1, 1, 2)
    assert_parity(ours, hf)


@torch.no_grad()
def test_coco80_keeps_the_real_coco_classes(tmp_path):
    """facebook/detr-resnet-50's 91 COCO-id outputs -> mmdet's 80 classes (+ background): the
    raw logits of the kept rows are the source's (the softmax renormalises over fewer)."""
    from mmdet_detrx.converters._original_common import COCO80_CLASSES, COCO91_IDS
    names = {i: f'id{i}' for i in range(91)}
    hf = build_hf('detr', encoder_layers=1, decoder_layers=1, id2label=names,
                  label2id={v: k for k, v in names.items()})
    ours, config_path, _ = convert_and_build(hf, tmp_path, coco80=True)
    cfg = Config.fromfile(config_path)
    assert cfg.metainfo.classes == COCO80_CLASSES and cfg.model.bbox_head.num_classes == 80
    (logits, boxes), (hf_logits, hf_boxes) = last_layer_outputs(ours, hf, IMAGE_SHAPES[1])
    torch.testing.assert_close(logits, hf_logits[..., list(COCO91_IDS) + [91]], atol=1e-4,
                               rtol=0)
    torch.testing.assert_close(boxes, hf_boxes, atol=1e-4, rtol=0)


def test_conditional_detr(tmp_path):
    hf = build_hf('conditional_detr')
    ours, config_path, _ = convert_and_build(hf, tmp_path)
    assert type(ours).__name__ == 'ConditionalDETRX'
    assert "'mmdet::conditional_detr/" in open(config_path).read()
    assert_parity(ours, hf)


def test_bare_state_dict_file(tmp_path):
    """A state-dict file (no config.json): layout and hyper-parameters from the key names and
    shapes (the backbone's too); the heads, in no shape, are assumed 8 (HF's default)."""
    from mmdet_detrx.converters import convert, write_safetensors
    hf = build_hf('detr', encoder_attention_heads=8, decoder_attention_heads=8)
    path = tmp_path / 'detr.safetensors'
    path.write_bytes(write_safetensors(hf.state_dict()))
    assert get_layout('hf-detr').match(load_source(str(path))).full
    config_path, checkpoint_path = convert(str(path), str(tmp_path / 'out'))
    from _helpers.hf_detrs import build_model_from_config
    from mmengine.runner import load_checkpoint
    ours, _ = build_model_from_config(config_path)
    load_checkpoint(ours, checkpoint_path, map_location='cpu', strict=True)
    ours.eval()
    cfg = Config.fromfile(config_path)
    assert cfg.metainfo.classes == tuple(f'class_{i}' for i in range(5))
    assert_parity(ours, hf)
