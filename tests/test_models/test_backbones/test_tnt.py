"""TNT backbone: timm equality, any input size, visual words, checkpoints, bad arguments."""
import pytest
import torch
from _helpers.backbones import (assert_config_trains_and_evaluates,
                                assert_equals_timm_forward_features,
                                assert_every_parameter_has_a_gradient,
                                assert_timm_checkpoint_is_refused,
                                assert_two_stride_16_maps_of_64_channels,
                                assert_with_cp_gives_same_gradients, num_params, timm_checkpoint)
from _helpers.backbones import timm  # noqa: F401 (a fixture)
from mmdet.registry import MODELS

import mmdet_detrx  # noqa: F401
from mmdet_detrx.models.backbones.tnt import TNT
from mmdet_detrx.models.layers.pixel_embed import PixelEmbed

MINI = dict(embed_dims=64, inner_dims=8, num_layers=2, num_heads=2, inner_num_heads=2,
            mlp_ratio=2.)


@pytest.mark.parametrize('arch, timm_name', [
    ('small', 'tnt_s_patch16_224'),
    pytest.param('base', 'tnt_b_patch16_224', marks=pytest.mark.slow)])
def test_arch_is_timms(timm, arch, timm_name):
    ours = MODELS.build(dict(type='TNT', arch=arch))
    reference = timm.create_model(timm_name, pretrained=False)
    assert num_params(ours) == num_params(reference) - num_params(reference.head)
    assert len(ours.layers) == len(reference.blocks) == 12


def test_equals_timm_forward_features(timm, tmp_path):
    assert_equals_timm_forward_features(timm, tmp_path, 'TNT', 'tnt_s_patch16_224')


def test_qk_and_v_are_stacked_into_qkv(timm, tmp_path):
    reference, path = timm_checkpoint(timm, 'tnt_s_patch16_224', tmp_path)
    ours = TNT(arch='small', init_cfg=dict(type='Pretrained', checkpoint=path))
    ours.init_weights()
    block = reference.blocks[5]
    for ours_attn, (qk, v) in ((ours.layers[5].inner.attn, (block.attn_in.qk, block.attn_in.v)),
                               (ours.layers[5].outer.attn, (block.attn_out.qk, block.attn_out.v))):
        assert ours_attn.qkv.bias is None
        torch.testing.assert_close(ours_attn.qkv.weight, torch.cat([qk.weight, v.weight]))


def test_visual_words():
    embed = PixelEmbed(3, inner_dims=8, patch_size=16, inner_patch_size=4)
    x = torch.randn(2, 3, 40, 50)  # padded to 48 x 64: a 3 x 4 grid of patches
    words, grid = embed(x)
    assert grid == (3, 4) and words.shape == (2 * 12, 16, 8)
    # Patch (row 1, col 2) of image 1 sees only its own 16x16 pixels.
    with torch.no_grad():
        x2 = x.clone()
        x2[1, :, 16:32, 32:48] += 1
        words2, _ = embed(x2)
    changed = (words2 - words).abs().flatten(1).amax(1).reshape(2, 3, 4) > 0
    assert changed.sum() == 1 and changed[1, 1, 2]


@pytest.mark.parametrize('size', [(513, 771), (800, 1216)])
def test_any_input_size(size):
    torch.manual_seed(0)
    assert_two_stride_16_maps_of_64_channels(TNT(arch=MINI, out_indices=(0, 1)), size)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    tnt = TNT(arch=MINI)
    tnt.train()
    tnt(torch.randn(2, 3, 100, 130))[0].square().mean().backward()  # 7x9 grid: resized table
    assert_every_parameter_has_a_gradient(tnt)


def test_with_cp_gives_same_gradients():
    assert_with_cp_gives_same_gradients(lambda **kwargs: TNT(arch=MINI, **kwargs))


def test_drop_path_in_inner_and_outer_transformers():
    tnt = TNT(arch=MINI, drop_path_rate=0.4)
    last = tnt.layers[-1]
    assert last.inner.drop_path.drop_prob == last.outer.drop_path.drop_prob == pytest.approx(0.4)
    x = torch.randn(4, 3, 64, 64)
    tnt.eval()
    with torch.no_grad():
        assert torch.equal(tnt(x)[0], tnt(x)[0])
        tnt.train()
        assert not torch.equal(tnt(x)[0], tnt(x)[0])


def test_frozen_stages():
    tnt = TNT(arch=MINI, frozen_stages=1)
    frozen = [tnt.pixel_embed, tnt.proj_norm1, tnt.proj, tnt.proj_norm2, tnt.pos_embed,
              tnt.layers[0]]
    assert not tnt.cls_token.requires_grad
    assert not any(p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for p in tnt.layers[1].parameters())
    tnt.train()
    assert not any(m.training for m in frozen) and tnt.layers[1].training


def test_wrong_checkpoint_names_the_keys(timm, tmp_path):
    assert_timm_checkpoint_is_refused(timm, tmp_path, TNT, 'vit_small_patch16_224',
                                      r'missing from the checkpoint: .*inner')
    assert_timm_checkpoint_is_refused(timm, tmp_path, TNT, 'tnt_s_legacy_patch16_224',
                                      r'not in TNT: .*layers\.0\.proj\.bias')


@pytest.mark.parametrize('kwargs, argument', [
    (dict(inner_patch_size=5), 'inner_patch_size'),
    (dict(inner_patch_size=32), 'inner_patch_size'),
    (dict(patch_size=15), 'patch_size'),
    (dict(patch_size=32, pretrain_img_size=(224, 240)), 'pretrain_img_size'),
    (dict(arch=dict(MINI, num_heads=3)), 'num_heads'),
    (dict(arch=dict(MINI, inner_dims=10, inner_num_heads=4)), 'inner_num_heads'),
    (dict(arch='tiny'), 'arch'),
    (dict(out_indices=(2, )), 'out_indices'),
    (dict(frozen_stages=-2), 'frozen_stages'),
])
def test_rejects_bad_arguments(kwargs, argument):
    kwargs = {'arch': MINI, **kwargs}
    with pytest.raises(ValueError, match=argument):
        TNT(**kwargs)


def test_synthetic_shapes_config_trains_and_evaluates(tmp_path):
    assert_config_trains_and_evaluates(
        'configs/tnt/faster-rcnn_tnt-t6_sfp_1xb8-4e_synthetic-shapes.py', tmp_path, TNT,
        lambda tnt: tnt.layers[0].inner.attn.qkv.weight)
