"""SimpleFeaturePyramid: strides and shapes, and ViT/TNT + the neck inside mmdet detectors."""
import os.path as osp

import pytest
import torch
import torch.nn.functional as F
from mmdet.registry import MODELS
from mmengine.config import Config

import mmdet_detrx  # noqa: F401
from mmdet_detrx.models.layers.layer_norm_2d import LayerNorm2d
from mmdet_detrx.models.necks import SimpleFeaturePyramid

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))


@pytest.mark.parametrize('size', [(50, 76), (33, 49)])
def test_vitdet_strides_4_to_32(size):
    neck = SimpleFeaturePyramid(in_channels=64, out_channels=32)
    x = torch.randn(2, 64, *size)
    outs = neck((torch.randn(2, 64, 3, 3), x))  # the last backbone output is used
    h, w = size
    assert [o.shape for o in outs] == [(2, 32, 4 * h, 4 * w), (2, 32, 2 * h, 2 * w),
                                       (2, 32, h, w), (2, 32, (h + 1) // 2, (w + 1) // 2)]


def test_extra_levels_for_rpn_and_detr():
    x = torch.randn(1, 64, 20, 30)
    rpn = SimpleFeaturePyramid(64, 16, num_outs=5)  # mmdet FPN's max-pooled P6
    outs = rpn([x])
    assert [o.shape[-2:] for o in outs] == [(80, 120), (40, 60), (20, 30), (10, 15), (5, 8)]
    torch.testing.assert_close(outs[4], F.max_pool2d(outs[3], 1, stride=2))
    detr = SimpleFeaturePyramid(64, 16, scale_factors=(2.0, 1.0, 0.5), num_outs=4,
                                extra_level='conv')
    outs = detr([x])
    assert [o.shape[-2:] for o in outs] == [(40, 60), (20, 30), (10, 15), (5, 8)]
    assert len(detr.extra_convs) == 1


def test_layer_norm_2d_normalises_each_position():
    norm = LayerNorm2d(8)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = torch.randn(2, 8, 5, 7)
    expected = F.layer_norm(x.permute(0, 2, 3, 1), (8, ), norm.weight, norm.bias, 1e-6)
    torch.testing.assert_close(norm(x), expected.permute(0, 3, 1, 2))
    assert isinstance(MODELS.build(dict(type='LN2d', num_channels=4)), LayerNorm2d)


def test_gradients_reach_every_parameter():
    neck = SimpleFeaturePyramid(32, 16, num_outs=6, extra_level='conv')
    x = torch.randn(1, 32, 8, 10, requires_grad=True)
    torch.manual_seed(0)
    # A random projection: the mean of a LayerNorm-ed map would have no gradient.
    sum((o * torch.randn_like(o)).sum() for o in neck([x])).backward()
    for name, param in neck.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize('kwargs, argument', [
    (dict(in_channels=64, scale_factors=(3.0, )), 'scale_factors'),
    (dict(in_channels=64, scale_factors=(1.0, 2.0)), 'scale_factors'),
    (dict(in_channels=64, scale_factors=()), 'scale_factors'),
    (dict(in_channels=66), 'in_channels'),
    (dict(in_channels=0), 'in_channels'),
    (dict(in_channels=64, num_outs=3), 'num_outs'),
    (dict(in_channels=64, num_outs=5, extra_level='deconv'), 'extra_level'),
])
def test_rejects_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        SimpleFeaturePyramid(**kwargs)


VIT_MINI = dict(type='ViT', arch=dict(embed_dims=64, num_layers=2, num_heads=2,
                                      feedforward_channels=128), init_cfg=None)
TNT_MINI = dict(type='TNT', arch=dict(embed_dims=64, inner_dims=8, num_layers=2, num_heads=2,
                                      inner_num_heads=2, mlp_ratio=2.), init_cfg=None)


@pytest.mark.parametrize('config, backbone', [
    ('configs/vit/mask-rcnn_vit-s_sfp_1x_coco.py', VIT_MINI),
    # the other two pairings run with --runslow (same code paths, other combination)
    pytest.param('configs/vit/dinox-4scale_vit-s_sfp_8xb2-12e_coco.py', VIT_MINI,
                 marks=pytest.mark.slow),
    pytest.param('configs/tnt/deformable-detrx_tnt-s_sfp_16xb2-50e_coco.py', TNT_MINI,
                 marks=pytest.mark.slow),
    ('configs/tnt/dinox-4scale_tnt-s_sfp_8xb2-12e_coco.py', TNT_MINI),
])
def test_plugs_into_detectors_by_config(config, backbone):
    """The COCO configs' detectors (our DINOX/DeformableDETRX with MSDeformAttn, mmdet's Mask
    R-CNN) train on ViT/TNT + neck features: losses are finite and reach the backbone."""
    from mmdet.testing import demo_mm_inputs
    cfg = Config.fromfile(osp.join(ROOT, config))
    cfg.model.backbone = backbone  # small widths; the architecture is what the config builds
    cfg.model.neck.in_channels = 64
    if 'dino' in config:
        cfg.model.dn_cfg.group_cfg.num_dn_queries = 20
        cfg.model.num_queries = 30
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.train()
    data = demo_mm_inputs(2, [(3, 96, 128), (3, 80, 112)], num_items=[3, 2], num_classes=80,
                          with_mask='mask-rcnn' in config)
    data = model.data_preprocessor(data, True)
    losses = model(**data, mode='loss')
    total, _ = model.parse_losses(losses)  # sums every loss term, as train_step does
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0
    if 'detrx' in config or 'dinox' in config:
        from mmdet_detrx.models.layers import MSDeformAttn
        assert any(isinstance(m, MSDeformAttn) for m in model.modules())
