"""DINOX loads mmdet 3.3 DINO checkpoints exactly on either stack (OneDL's decoder is wider)."""
import os.path as osp

import pytest
import torch
from _helpers import REPO_CONFIGS
from _helpers.detectors import shrink_deformable_detr
from mmdet.models.layers.transformer.utils import MLP, coordinate_to_encoding
from mmdet.registry import MODELS
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.runner.checkpoint import load_state_dict
from torch import nn

from mmdet_detrx.models.detectors.dino_ref_point_head import (adapt_ref_point_head,
                                                              expand_ref_point_weight)

init_default_scope('mmdet')
KEY = 'decoder.ref_point_head.layers.0.weight'


@pytest.mark.parametrize('num_feats', [256, 512])
def test_expanded_weight_computes_what_mmdet33_computed(num_feats):
    """The mmdet 3.3 encoding (num_feats 128) times its weight == the wide encoding times the
    expanded weight: same first-layer output for any boxes."""
    torch.manual_seed(0)
    boxes = torch.rand(2, 7, 4)  # (batch, queries, cx cy w h)
    weight = torch.randn(16, 4 * 128, dtype=torch.float64)
    narrow = coordinate_to_encoding(boxes, num_feats=128).double()  # (2, 7, 512)
    wide = coordinate_to_encoding(boxes, num_feats=num_feats).double()  # (2, 7, 4 * num_feats)
    expanded = expand_ref_point_weight(weight, num_feats)
    assert expanded.shape == (16, 4 * num_feats)
    torch.testing.assert_close(wide @ expanded.T, narrow @ weight.T, rtol=1e-6, atol=1e-6)


def test_expansion_refuses_widths_without_the_narrow_frequencies():
    with pytest.raises(ValueError, match='not a multiple'):
        expand_ref_point_weight(torch.zeros(4, 512), 192)


class _WideDecoder(nn.Module):
    """OneDL's DinoTransformerDecoder's head at embed_dims 256 (on either stack)."""

    def __init__(self):
        super().__init__()
        self.ref_point_head = MLP(4 * 256, 256, 256, 2)


@pytest.mark.parametrize('loader', ['torch', 'mmengine'])
def test_wide_head_loads_mmdet33_layout(loader):
    decoder = _WideDecoder()
    adapt_ref_point_head(decoder)
    narrow = MLP(2 * 256, 256, 256, 2).state_dict()
    state = {f'ref_point_head.{k}': v for k, v in narrow.items()}
    if loader == 'torch':
        decoder.load_state_dict(state, strict=True)
    else:
        load_state_dict(decoder, state, strict=True)
    torch.testing.assert_close(decoder.ref_point_head.layers[0].weight,
                               expand_ref_point_weight(narrow['layers.0.weight'], 256))
    # a checkpoint already in the wide layout loads unchanged
    wide = {k: v.clone() for k, v in decoder.state_dict().items()}
    wide['ref_point_head.layers.0.weight'].normal_()
    decoder.load_state_dict(wide, strict=True)
    torch.testing.assert_close(decoder.ref_point_head.layers[0].weight,
                               wide['ref_point_head.layers.0.weight'])


def test_dinox_strict_loads_an_mmdet33_dino_state_dict():
    """What model-zoo DINO checkpoints hold: a (256, 512) first ref_point_head layer."""
    cfg = shrink_deformable_detr(
        Config.fromfile(osp.join(REPO_CONFIGS, 'dino/dinox-4scale_r50_8xb2-12e_coco.py')).model,
        num_layers=1, num_queries=10)
    model = MODELS.build(cfg)
    state = model.state_dict()
    embed_dims = model.decoder.embed_dims
    state[KEY] = torch.randn(embed_dims, 512)
    model.load_state_dict(state, strict=True)
    expected = state[KEY] if model.decoder.ref_point_head.layers[0].in_features == 512 else \
        expand_ref_point_weight(state[KEY], embed_dims)
    torch.testing.assert_close(model.decoder.ref_point_head.layers[0].weight, expected)
