"""A config that names a registered attention type under mmdet's *plain* DETR-family detector
fails before anything is built, with a TypeError naming the ...X detector to use (it used to be
`TypeError: ... unexpected keyword argument 'type'` from deep inside mmcv)."""
import os.path as osp

import pytest
from mmdet.models.detectors import DeformableDETR
from mmdet.registry import MODELS as MMDET_MODELS
from mmengine.config import Config
from mmengine.registry import MODELS

from mmdet_detrx.models.detectors import DeformableDETRX, check_attention_types

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
DEMO = osp.join(ROOT, 'configs/demo/deformable-detrx_r18_1xb8-1000i_synthetic-shapes.py')
DETR = osp.join(ROOT, 'configs/detr/detr_r18-dc5_1xb8-3000i_synthetic-shapes.py')


def plain(path, detector):
    cfg = Config.fromfile(path).model
    cfg.type = detector
    return cfg


@pytest.mark.parametrize('registry', [MODELS, MMDET_MODELS], ids=['mmengine', 'mmdet'])
def test_plain_deformable_detr_names_deformable_detrx(registry):
    with pytest.raises(TypeError) as error:
        registry.build(plain(DEMO, 'DeformableDETR'))
    message = str(error.value)
    assert "type='DeformableDETRX'" in message
    assert "encoder.layer_cfg.self_attn_cfg.type='MSDeformAttn'" in message
    assert "decoder.layer_cfg.cross_attn_cfg.type='MSDeformAttn'" in message
    assert 'unexpected keyword' not in message


def test_plain_detr_with_act_names_detrx():
    cfg = plain(DETR, 'DETR')
    cfg.encoder.layer_cfg.self_attn_cfg.update(type='AdaptiveClusteringAttention', num_hashes=4)
    with pytest.raises(TypeError, match=r"use type='DETRX'"):
        MODELS.build(cfg)


def test_subclass_of_a_plain_detector_is_told_how_to_make_one():
    cfg = plain(DEMO, DeformableDETR)  # a class, not a name, and one without an X twin below
    cfg.type = type('MyDeformableDETR', (DeformableDETR, ), {})
    with pytest.raises(TypeError, match=r'class MyDeformableDETRX\(RegistryAttentionMixin, '
                                        r'MyDeformableDETR\)'):
        check_attention_types(cfg)


def test_valid_configs_are_untouched():
    check_attention_types(Config.fromfile(DEMO).model)  # our X detector
    check_attention_types(plain(DETR, 'DETR'))  # plain detector, no attention type named
    check_attention_types(dict(type='ResNet', depth=18))
    model = MODELS.build(Config.fromfile(DEMO).model)
    assert isinstance(model, DeformableDETRX)
