"""IDEA-Research/DINO and detrex DINO checkpoints -> DINOX.

No reference implementation of DINO runs here, so these maps are checked by what does not need
one: the key set and shapes written from the original module definitions
(``_helpers.original_detrs.dino_official_state_dict``) convert with the layout detected, load
strictly into the model built from the written config, every tensor lands where the module
trees say (checked value by value on the parts that are easy to swap: decoder norms, the encoder
proposal head, the denoising label embedding), and the model runs. docs/converters.md says so.
"""
import pytest
import torch
from _helpers.original_detrs import (dino_official_state_dict, official_dino_to_detrex,
                                     save_official)
from mmdet.structures import DetDataSample
from mmengine.config import Config

from mmdet_detrx.converters import ConversionError, convert_source
from mmdet_detrx.converters._convert import build_model_from_config
from mmdet_detrx.utils.safe_checkpoint import load_checkpoint_file

pytest.importorskip('torchvision')  # the original backbone's keys come from torchvision's ResNet

ARGS = dict(nheads=8, enc_n_points=4, dec_n_points=2, pe_temperatureH=20, pe_temperatureW=20,
            dilation=False, dropout=0.0, dn_number=100, dn_label_noise_ratio=0.5,
            dn_box_noise_scale=1.0, num_queries=20)


def _convert(path, tmp_path):
    result = convert_source(path, str(tmp_path / 'out'))
    state_dict = load_checkpoint_file(result.checkpoint_path)['state_dict']
    return result, state_dict


@torch.no_grad()
def _runs(result):
    """Build ours from the written config, load the checkpoint strictly, run a padded batch."""
    ours, _ = build_model_from_config(result.config_path)
    ours.load_state_dict(load_checkpoint_file(result.checkpoint_path)['state_dict'], strict=True)
    pixels, samples = torch.randn(2, 3, 96, 160), []
    for h, w in [(96, 128), (64, 160)]:
        sample = DetDataSample()
        sample.set_metainfo(dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(96, 160),
                                 batch_input_shape=(96, 160), scale_factor=(1.0, 1.0)))
        samples.append(sample)
    cls_scores, bbox_preds = ours.eval()(pixels, samples, mode='tensor')[:2]
    assert torch.isfinite(cls_scores).all() and torch.isfinite(bbox_preds).all()
    return cls_scores, bbox_preds


def test_dino_official_key_map(tmp_path):
    source = dino_official_state_dict(dec_points=2, labelbook=91)
    path = save_official(tmp_path / 'checkpoint0011_4scale.pth', source, **ARGS)
    result, ours = _convert(path, tmp_path)
    assert result.layout == 'dino-official'
    # the decoder numbers its norms in another order than the layer runs them
    for n in range(3):
        for src, dst in (('norm2', 'norms.0'), ('norm1', 'norms.1'), ('norm3', 'norms.2')):
            assert torch.equal(ours[f'decoder.layers.{n}.{dst}.weight'],
                               source[f'transformer.decoder.layers.{n}.{src}.weight'])
        assert torch.equal(ours[f'bbox_head.reg_branches.{n}.4.bias'],
                           source[f'bbox_embed.{n}.layers.2.bias'])
    # the encoder's proposal head is the last branch; DINO's label book has one row more
    assert torch.equal(ours['bbox_head.cls_branches.3.weight'],
                       source['transformer.enc_out_class_embed.weight'])
    assert torch.equal(ours['bbox_head.reg_branches.3.2.weight'],
                       source['transformer.enc_out_bbox_embed.layers.1.weight'])
    assert torch.equal(ours['dn_query_generator.label_embedding.weight'],
                       source['label_enc.weight'][:91])
    assert torch.equal(ours['query_embedding.weight'], source['transformer.tgt_embed.weight'])
    assert torch.equal(ours['decoder.ref_point_head.layers.1.bias'],
                       source['transformer.decoder.ref_point_head.layers.1.bias'])
    assert torch.equal(ours['neck.extra_convs.0.gn.weight'], source['input_proj.3.1.weight'])
    assert torch.equal(ours['neck.convs.2.conv.bias'], source['input_proj.2.0.bias'])
    assert not [k for k in ours if 'transformer' in k]
    cfg = Config.fromfile(result.config_path).model
    assert cfg.type == 'DINOX' and cfg.num_queries == 20
    assert cfg.positional_encoding.temperature == 20 and cfg.positional_encoding.offset == 0
    assert cfg.encoder.layer_cfg.self_attn_cfg.num_points == 4
    assert cfg.decoder.layer_cfg.cross_attn_cfg.num_points == 2
    assert cfg.dn_cfg.group_cfg.num_dn_queries == 100
    assert result.classes[1] == 'person'
    assert any('label_enc rows 91..91 dropped' in note for note in result.notes)
    _runs(result)


def test_dino_official_refuses_options_mmdet_lacks(tmp_path):
    source = dino_official_state_dict(enc_layers=1, dec_layers=1)
    source['transformer.two_stage_wh_embedding.weight'] = torch.zeros(1, 2)
    path = save_official(tmp_path / 'learn_wh.pth', source, **ARGS)
    with pytest.raises(ConversionError, match='two_stage_learn_wh'):
        convert_source(path, str(tmp_path / 'out'))
    assert not (tmp_path / 'out').exists()


def test_dino_official_wrong_heads_named(tmp_path):
    """Heads are not in the shapes: args that contradict the sampling points are refused."""
    source = dino_official_state_dict(enc_layers=1, dec_layers=1)
    path = save_official(tmp_path / 'x.pth', source, **dict(ARGS, nheads=8, enc_n_points=3))
    with pytest.raises(ConversionError, match='args say 3 sampling points'):
        convert_source(path, str(tmp_path / 'out'))


def test_detrex_dino_key_map(tmp_path):
    official = dino_official_state_dict(num_classes=80, dec_layers=2)
    source = official_dino_to_detrex(official, num_classes=80)
    assert 'class_embed.2.weight' in source and 'backbone.stem.conv1.norm.weight' in source
    path = save_official(tmp_path / 'dino_r50_4scale_12ep.pth', source)
    result, ours = _convert(path, tmp_path)
    assert result.layout == 'detrex-dino'
    assert torch.equal(ours['backbone.layer2.1.bn2.running_mean'],
                       official['backbone.0.body.layer2.1.bn2.running_mean'])
    assert torch.equal(ours['backbone.layer3.0.downsample.1.weight'],
                       official['backbone.0.body.layer3.0.downsample.1.weight'])
    assert torch.equal(ours['decoder.layers.1.norms.0.bias'],
                       official['transformer.decoder.layers.1.norm2.bias'])
    assert torch.equal(ours['bbox_head.cls_branches.2.bias'],
                       official['transformer.enc_out_class_embed.bias'])
    assert torch.equal(ours['level_embed'], official['transformer.level_embed'])
    cfg = Config.fromfile(result.config_path).model
    assert cfg.positional_encoding.offset == -0.5
    assert cfg.positional_encoding.temperature == 10000
    assert result.classes[0] == 'person' and len(result.classes) == 80
    _runs(result)


def test_dino_official_coco80(tmp_path):
    """--coco80 on DINO: every class head, the encoder's proposal head included (DINO ranks
    proposals by the best class score), and the denoising label embedding keep the 80 ids."""
    from mmdet_detrx.converters._original_common import COCO91_IDS
    source = dino_official_state_dict(enc_layers=1, dec_layers=2, dec_points=2, labelbook=91)
    path = save_official(tmp_path / 'checkpoint0011_4scale.pth', source, **ARGS)
    result = convert_source(path, str(tmp_path / 'out'), coco80=True)
    ours = load_checkpoint_file(result.checkpoint_path)['state_dict']
    ids = list(COCO91_IDS)
    assert result.classes[0] == 'person' and len(result.classes) == 80
    assert torch.equal(ours['bbox_head.cls_branches.2.weight'],
                       source['transformer.enc_out_class_embed.weight'][ids])
    assert torch.equal(ours['bbox_head.cls_branches.0.bias'], source['class_embed.0.bias'][ids])
    assert torch.equal(ours['dn_query_generator.label_embedding.weight'],
                       source['label_enc.weight'][ids])
    assert Config.fromfile(result.config_path).model.bbox_head.num_classes == 80
    assert any('proposal selection ignores' in note for note in result.notes)
