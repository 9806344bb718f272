"""fundamentalvision/Deformable-DETR and detrex Deformable DETR ``.pth`` -> DeformableDETRX:
equal outputs to the reference.

The reference is a tiny random-init HF ``DeformableDetrForObjectDetection`` with a timm ResNet.
Its weights, renamed to the original layout with the renames HF's conversion script documents,
saved with the training ``args`` and converted (layout detected), must give HF's last-layer
logits and boxes within 1e-4 on a non-square image and a padded batch of two sizes: plain, with
iterative box refinement, and two-stage. detrex's layout is the original one renamed by
detrex's own converter's rules; detrex evaluates without padding masks, so that comparison is
on single images.
"""
import pytest
import torch
from _helpers.hf_detrs import assert_parity, build_hf, has_timm, last_layer_outputs, timm_backbone
from _helpers.original_detrs import (hf_to_official_deformable_detr,
                                     official_to_detrex_deformable_detr, save_official)
from mmengine.config import Config
from mmengine.runner import load_checkpoint

from mmdet_detrx.converters import ConversionError, convert_source
from mmdet_detrx.converters._convert import build_model_from_config
from mmdet_detrx.converters._original_common import COCO91_IDS, compact_coco91

pytestmark = pytest.mark.skipif(not has_timm(), reason='the reference uses a timm ResNet')

ARGS = dict(nheads=4, enc_n_points=2, dec_n_points=3, num_queries=15, dilation=False,
            dropout=0.1, hidden_dim=256)


def _hf_deformable(**overrides):
    kwargs = dict(backbone_config=timm_backbone('resnet18', out_indices=(2, 3, 4)),
                  encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4)
    kwargs.update(overrides)
    hf = build_hf('deformable_detr', **kwargs)
    if kwargs.get('two_stage'):
        # Hold the two-stage proposal selection fixed: random weights give near-tied token
        # scores, so spread the proposal classifier's column-0 scores far beyond rounding.
        proposal = hf.class_embed[-1]
        with torch.no_grad():
            proposal.weight.mul_(50)
            proposal.bias.mul_(50)
    return hf


def _convert_and_build(path, tmp_path, **kwargs):
    result = convert_source(path, str(tmp_path / 'out'), **kwargs)
    ours, _ = build_model_from_config(result.config_path)
    load_checkpoint(ours, result.checkpoint_path, map_location='cpu', strict=True)
    return ours.eval(), result


@pytest.mark.parametrize('refine,two_stage', [(False, False), (True, False), (True, True)])
def test_deformable_detr_official_equals_reference(tmp_path, refine, two_stage):
    hf = _hf_deformable(with_box_refine=refine, two_stage=two_stage)
    weights = hf_to_official_deformable_detr(hf.state_dict())
    assert ('transformer.decoder.bbox_embed.0.layers.0.weight' in weights) == refine
    path = save_official(tmp_path / 'checkpoint.pth', weights, **ARGS, with_box_refine=refine,
                         two_stage=two_stage)
    ours, result = _convert_and_build(path, tmp_path)
    assert result.layout == 'deformable-detr-official'
    assert type(ours).__name__ == 'DeformableDETRX'
    cfg = Config.fromfile(result.config_path).model
    assert (cfg.with_box_refine, cfg.as_two_stage) == (refine, two_stage)
    assert cfg.num_queries == (15 if two_stage else 12) and cfg.num_feature_levels == 4
    assert cfg.encoder.layer_cfg.self_attn_cfg.num_points == 2
    assert cfg.decoder.layer_cfg.cross_attn_cfg.num_points == 3
    assert cfg.neck.in_channels == [128, 256, 512] and cfg.neck.bias
    assert_parity(ours, hf)


def test_deformable_detr_without_args_uses_repository_defaults(tmp_path):
    hf = _hf_deformable(encoder_attention_heads=8, decoder_attention_heads=8, encoder_layers=1)
    path = save_official(tmp_path / 'r50_deformable_detr.pth',
                         hf_to_official_deformable_detr(hf.state_dict()))
    ours, result = _convert_and_build(path, tmp_path)
    assert any('args.nheads' in note for note in result.notes)
    assert_parity(ours, hf)


def test_deformable_detr_coco_category_ids_compact_exactly(tmp_path):
    """91 sigmoid outputs indexed by COCO id: compact_coco91 keeps the 80 real classes with
    exactly the source's scores (refinement + two-stage: the proposal head keeps column 0)."""
    hf = _hf_deformable(with_box_refine=True, two_stage=True, encoder_layers=1,
                        decoder_layers=1)
    torch.manual_seed(1)
    with torch.no_grad():
        for index, head in enumerate(hf.class_embed):
            new = torch.nn.Linear(head.in_features, 91)
            if index == len(hf.class_embed) - 1:  # keep the proposal scores (column 0)
                new.weight[0] = head.weight[0]
                new.bias[0] = head.bias[0]
            hf.class_embed[index] = new
        hf.model.decoder.class_embed = hf.class_embed
    path = save_official(tmp_path / 'coco.pth', hf_to_official_deformable_detr(hf.state_dict()),
                         **ARGS)
    ours, result = _convert_and_build(path, tmp_path)
    assert result.classes[1] == 'person' and len(result.classes) == 91
    assert_parity(ours, hf)
    checkpoint = torch.load(result.checkpoint_path, map_location='cpu', weights_only=True)
    compact = compact_coco91(checkpoint['state_dict'], proposal_branch=1)
    cfg = Config.fromfile(result.config_path)
    cfg.model.bbox_head.num_classes = 80
    from mmdet.registry import MODELS
    ours80 = MODELS.build(cfg.model).eval()
    ours80.load_state_dict(compact, strict=True)
    (logits80, boxes80), (hf_logits, hf_boxes) = last_layer_outputs(ours80, hf, [(96, 160)])
    torch.testing.assert_close(logits80, hf_logits[..., list(COCO91_IDS)], atol=1e-4, rtol=0)
    torch.testing.assert_close(boxes80, hf_boxes, atol=1e-4, rtol=0)


def test_deformable_detr_differing_head_copies_are_refused(tmp_path):
    hf = _hf_deformable(with_box_refine=True, encoder_layers=1)
    weights = hf_to_official_deformable_detr(hf.state_dict())
    weights['transformer.decoder.bbox_embed.0.layers.0.weight'] += 1
    path = save_official(tmp_path / 'broken.pth', weights, **ARGS)
    with pytest.raises(ConversionError, match='differs from bbox_embed.0.layers.0.weight'):
        convert_source(path, str(tmp_path / 'out'))
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('refine', [False, True])
def test_detrex_deformable_detr_equals_reference(tmp_path, refine):
    hf = _hf_deformable(with_box_refine=refine, encoder_attention_heads=8,
                        decoder_attention_heads=8, encoder_layers=1, decoder_layers=2)
    weights = official_to_detrex_deformable_detr(
        hf_to_official_deformable_detr(hf.state_dict()))
    assert 'backbone.res2.0.conv1.norm.running_var' in weights
    path = save_official(tmp_path / 'detrex_model_final.pth', weights)
    ours, result = _convert_and_build(path, tmp_path)
    assert result.layout == 'detrex-deformable-detr'
    assert Config.fromfile(result.config_path).model.positional_encoding.offset == -0.5
    for shapes in ([(96, 160)], [(128, 96)]):  # single images: detrex masks no padding
        (logits, boxes), (hf_logits, hf_boxes) = last_layer_outputs(ours, hf, shapes)
        torch.testing.assert_close(logits, hf_logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(boxes, hf_boxes, atol=1e-4, rtol=0)


def test_detrex_deformable_detr_two_stage(tmp_path):
    """detrex's two-stage module names (incl. its misspelt ``enc_outpout_norm``) map to the
    original's semantics; a checkpoint of the detrex version whose pos_trans_norm did not fit
    its input is refused by name."""
    hf = _hf_deformable(with_box_refine=True, two_stage=True, encoder_attention_heads=8,
                        decoder_attention_heads=8, encoder_layers=1)
    weights = official_to_detrex_deformable_detr(
        hf_to_official_deformable_detr(hf.state_dict()))
    for param in ('weight', 'bias'):
        weights[f'transformer.enc_outpout_norm.{param}'] = weights.pop(
            f'transformer.enc_output_norm.{param}')
    path = save_official(tmp_path / 'two_stage.pth', weights)
    ours, result = _convert_and_build(path, tmp_path / 'a')
    assert result.layout == 'detrex-deformable-detr'
    cfg = Config.fromfile(result.config_path).model
    assert cfg.as_two_stage and cfg.with_box_refine
    # detrex's two-stage proposals (300) are not stored; the reference uses 15
    ours.num_queries = 15
    (logits, boxes), (hf_logits, hf_boxes) = last_layer_outputs(ours, hf, [(96, 160)])
    torch.testing.assert_close(logits, hf_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(boxes, hf_boxes, atol=1e-4, rtol=0)

    weights['transformer.pos_trans_norm.weight'] = torch.ones(256)
    weights['transformer.pos_trans_norm.bias'] = torch.zeros(256)
    path = save_official(tmp_path / 'old_detrex.pth', weights)
    with pytest.raises(ConversionError, match='pos_trans_norm has 256 features'):
        convert_source(path, str(tmp_path / 'b'))
