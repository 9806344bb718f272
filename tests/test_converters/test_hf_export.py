"""Ours -> HF (``to_hf``) for DETR and Deformable DETR: the HF folder loads with transformers'
``from_pretrained``, gives our outputs, and converts back to the same weights bit for bit."""
import pytest
import torch
from _helpers.hf_detrs import assert_parity, build_hf, convert_and_build, has_timm, timm_backbone
from mmengine.config import Config
from transformers import AutoModelForObjectDetection

from mmdet_detrx.converters import convert
from mmdet_detrx.converters.hf_export import to_hf
from mmdet_detrx.utils.safe_checkpoint import load_checkpoint_file

VARIANTS = {
    'detr': dict(kind='detr'),
    'deformable-two-stage': dict(kind='deformable_detr', with_box_refine=True, two_stage=True,
                                 encoder_layers=1, decoder_layers=1),
    # (two decoder layers: transformers 5.23 cannot tie the shared heads of a one-layer decoder)
    'deformable-single-stage': dict(kind='deformable_detr', encoder_layers=1),
}


def round_trip(tmp_path, hf):
    ours, config_path, checkpoint_path = convert_and_build(hf, tmp_path)
    folder = to_hf(config_path, checkpoint_path, str(tmp_path / 'published'))
    back_config, back_checkpoint = convert(folder, str(tmp_path / 'back'))
    before = load_checkpoint_file(checkpoint_path)
    after = load_checkpoint_file(back_checkpoint)
    assert before['state_dict'].keys() == after['state_dict'].keys()
    for key, value in before['state_dict'].items():
        assert torch.equal(value, after['state_dict'][key]), key  # bit-exact
    assert after['meta']['dataset_meta'] == before['meta']['dataset_meta']
    assert Config.fromfile(back_config).model == Config.fromfile(config_path).model
    published = AutoModelForObjectDetection.from_pretrained(folder).eval()
    return ours, published


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_round_trip_is_bit_exact(tmp_path, variant):
    options = dict(VARIANTS[variant])
    hf = build_hf(options.pop('kind'), **options)
    ours, published = round_trip(tmp_path, hf)
    if variant == 'deformable-two-stage':
        return  # outputs: test_hf_deformable_detr (proposal ties); weights are bit-exact above
    assert_parity(ours, published)


@pytest.mark.skipif(not has_timm(), reason='DC5 is published with a timm backbone')
def test_dc5_is_published_with_a_timm_backbone(tmp_path):
    hf = build_hf('detr', backbone_config=timm_backbone('resnet18', output_stride=16),
                  encoder_layers=1, decoder_layers=1)
    ours, published = round_trip(tmp_path, hf)
    assert published.config.backbone_config.output_stride == 16
    assert_parity(ours, published)


def test_export_refuses_what_hf_cannot_hold(tmp_path):
    from mmdet_detrx.converters import ConversionError
    hf = build_hf('conditional_detr', encoder_layers=1, decoder_layers=1)
    _, config_path, checkpoint_path = convert_and_build(hf, tmp_path)
    with pytest.raises(ConversionError, match='ConditionalDETRX'):
        to_hf(config_path, checkpoint_path, str(tmp_path / 'x'))
    # ACT has no HF counterpart: the exact model is what gets published
    hf = build_hf('detr', encoder_layers=1, decoder_layers=1)
    _, config_path, checkpoint_path = convert_and_build(hf, tmp_path / 'detr')
    act = tmp_path / 'act.py'
    act.write_text(f"_base_ = {config_path!r}\nmodel = dict(encoder=dict(layer_cfg=dict("
                   "self_attn_cfg=dict(type='AdaptiveClusteringAttention'))))\n")
    assert Config.fromfile(str(act)).model.type == 'DETRX'
    with pytest.raises(ConversionError, match='AdaptiveClusteringAttention'):
        to_hf(str(act), checkpoint_path, str(tmp_path / 'y'))
    assert not (tmp_path / 'x').exists() and not (tmp_path / 'y').exists()
