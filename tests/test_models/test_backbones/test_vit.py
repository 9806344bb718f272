"""ViT backbone: timm equality, any input size, position-embedding resizing, checkpoints."""
import pytest
import torch
from _helpers.backbones import (assert_config_trains_and_evaluates,
                                assert_equals_timm_forward_features,
                                assert_every_parameter_has_a_gradient,
                                assert_timm_checkpoint_is_refused,
                                assert_two_stride_16_maps_of_64_channels,
                                assert_with_cp_gives_same_gradients, num_params, randomize_,
                                timm_checkpoint)
from _helpers.backbones import timm  # noqa: F401 (a fixture)
from mmdet.registry import MODELS

import mmdet_detrx  # noqa: F401
from mmdet_detrx.models.backbones.vit import ViT
from mmdet_detrx.models.layers.pos_embed import AbsolutePositionEmbedding, resize_pos_embed

# Small enough for fast CPU tests where equality with timm is not the point.
MINI = dict(embed_dims=64, num_layers=3, num_heads=2, feedforward_channels=128)


@pytest.mark.parametrize('arch, timm_name', [
    ('small', 'vit_small_patch16_224'),
    pytest.param('base', 'vit_base_patch16_224', marks=pytest.mark.slow)])
def test_arch_is_timms(timm, arch, timm_name):
    ours = MODELS.build(dict(type='ViT', arch=arch))
    reference = timm.create_model(timm_name, pretrained=False)
    head = num_params(reference.head)
    assert num_params(ours) == num_params(reference) - head
    assert ours.embed_dims == reference.embed_dim and len(ours.layers) == len(reference.blocks)


def test_equals_timm_forward_features(timm, tmp_path):
    assert_equals_timm_forward_features(timm, tmp_path, 'ViT', 'vit_small_patch16_224')


def test_intermediate_outputs_equal_timm_blocks(timm, tmp_path):
    reference, path = timm_checkpoint(timm, 'vit_small_patch16_224', tmp_path, seed=1)
    ours = ViT(arch='small', out_indices=(3, -1),
               init_cfg=dict(type='Pretrained', checkpoint=path))
    ours.init_weights()
    ours.eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        block3 = reference.forward_intermediates(x, indices=[3], intermediates_only=True)[0]
        outs = ours(x)
    assert len(outs) == 2
    torch.testing.assert_close(outs[0], block3, atol=1e-5, rtol=0)  # un-normed, no cls


@pytest.mark.parametrize('size', [(513, 771), (800, 1216)])
def test_any_input_size(size):
    torch.manual_seed(0)
    assert_two_stride_16_maps_of_64_channels(ViT(arch=MINI, out_indices=(0, 2)), size)


def test_padding_leaves_whole_patches_unchanged():
    # A 513x771 input is padded at the bottom/right only: the top-left patch tokens of the
    # first block see the same pixels as in the 512x768 crop, up to attention mixing, so
    # compare the patch embedding itself.
    vit = ViT(arch=MINI)
    x = torch.randn(1, 3, 513, 771)
    with torch.no_grad():
        tokens, grid = vit.patch_embed(x)
        crop_tokens, crop_grid = vit.patch_embed(x[..., :512, :768])
    assert grid == (33, 49) and crop_grid == (32, 48)
    full = tokens.reshape(1, 33, 49, -1)[:, :32, :48]
    torch.testing.assert_close(full, crop_tokens.reshape(1, 32, 48, -1))


def test_resize_matches_timm_bicubic(timm):
    from timm.layers import resample_abs_pos_embed
    table = torch.randn(1, 1 + 14 * 14, 32)
    for new_size in [(33, 49), (50, 76), (7, 9)]:
        ours = resize_pos_embed(table, (14, 14), new_size, num_extra_tokens=1)
        reference = resample_abs_pos_embed(table, list(new_size), old_size=[14, 14],
                                           num_prefix_tokens=1, antialias=False)
        torch.testing.assert_close(ours, reference)
        assert torch.equal(ours[:, :1], table[:, :1])  # the class token's entry is kept


def test_position_embedding_exact_at_pretraining_grid_and_cached():
    pos = AbsolutePositionEmbedding(16, (14, 14), num_extra_tokens=1)
    with torch.no_grad():
        assert pos((14, 14)) is pos.weight  # no interpolation at all at the pretraining size
        first = pos((33, 49))
        assert first.shape == (1, 1 + 33 * 49, 16)
        assert pos((33, 49)) is first  # cached per size
        other = pos((20, 30))
        assert pos((20, 30)) is other and pos((33, 49)) is first
        pos.weight.mul_(2)  # an optimizer step / load_state_dict writes in place
        refreshed = pos((33, 49))
    assert refreshed is not first
    torch.testing.assert_close(refreshed, 2 * first)
    # With gradients, the table is recomputed from the weight and gradients reach it.
    table = pos((33, 49))
    assert table.requires_grad
    table.sum().backward()
    assert pos.weight.grad is not None and pos.weight.grad.abs().sum() > 0


def test_cache_follows_dtype():
    pos = AbsolutePositionEmbedding(8, (4, 4))
    with torch.no_grad():
        fp32 = pos((6, 6))
        pos.to(torch.float64)
        fp64 = pos((6, 6))
    assert fp64.dtype == torch.float64 and fp32.dtype == torch.float32
    torch.testing.assert_close(fp64.float(), fp32)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    vit = ViT(arch=MINI, out_indices=(1, 2))
    vit.train()
    outs = vit(torch.randn(2, 3, 100, 130))  # 7x9 grid: the resized position table
    sum(o.square().mean() for o in outs).backward()
    assert_every_parameter_has_a_gradient(vit)


def test_with_cp_gives_same_gradients():
    assert_with_cp_gives_same_gradients(lambda **kwargs: ViT(arch=MINI, **kwargs))


def test_drop_path_only_while_training():
    torch.manual_seed(0)
    vit = ViT(arch=MINI, drop_path_rate=0.5)
    rates = [layer.ffn.dropout_layer.drop_prob if hasattr(layer.ffn.dropout_layer, 'drop_prob')
             else 0. for layer in vit.layers]
    assert rates == pytest.approx([0., 0.25, 0.5])
    x = torch.randn(4, 3, 64, 64)
    vit.eval()
    with torch.no_grad():
        assert torch.equal(vit(x)[0], vit(x)[0])
        vit.train()
        assert not torch.equal(vit(x)[0], vit(x)[0])


def test_frozen_stages():
    vit = ViT(arch=MINI, frozen_stages=2, drop_rate=0.5)
    frozen = [vit.patch_embed, vit.pos_embed, *vit.layers[:2]]
    assert not vit.cls_token.requires_grad
    assert not any(p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for p in vit.layers[2].parameters())
    assert all(p.requires_grad for p in vit.norm.parameters())
    vit.train()
    assert not any(m.training for m in frozen) and vit.layers[2].training
    all_frozen = ViT(arch=MINI, frozen_stages=3)
    assert not any(p.requires_grad for p in all_frozen.parameters())


def test_out_indices_and_final_norm():
    torch.manual_seed(0)
    vit = ViT(arch=MINI, out_indices=(-1, 0, 1))
    assert vit.out_indices == (0, 1, 2)
    no_norm = ViT(arch=MINI, final_norm=False)
    missing, unexpected = no_norm.load_state_dict(vit.state_dict(), strict=False)
    assert not missing and unexpected == ['norm.weight', 'norm.bias']
    with torch.no_grad():
        vit.norm.weight.normal_(), vit.norm.bias.normal_()
    vit.eval(), no_norm.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outs, (raw, ) = vit(x), no_norm(x)
    assert len(outs) == 3
    # Only the last block's output goes through the final norm (per token, over channels).
    expected = vit.norm(raw.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(outs[-1], expected)


def test_no_class_token():
    vit = ViT(arch=MINI, with_cls_token=False)
    assert vit.cls_token is None and vit.pos_embed.weight.shape == (1, 14 * 14, 64)
    assert 'cls_token' not in vit.state_dict()
    vit.eval()
    with torch.no_grad():
        (out, ) = vit(torch.randn(1, 3, 96, 80))
    assert out.shape == (1, 64, 6, 5)


def test_checkpoint_without_class_token_in_model(timm, tmp_path):
    reference, path = timm_checkpoint(timm, 'vit_small_patch16_224', tmp_path)
    vit = ViT(arch='small', with_cls_token=False,
              init_cfg=dict(type='Pretrained', checkpoint=path))
    vit.init_weights()
    torch.testing.assert_close(vit.pos_embed.weight, reference.pos_embed[:, 1:])


def test_checkpoint_of_another_grid_is_resized(timm, tmp_path):
    reference, path = timm_checkpoint(timm, 'vit_small_patch16_384', tmp_path)
    vit = ViT(arch='small', init_cfg=dict(type='Pretrained', checkpoint=path))
    vit.init_weights()
    expected = resize_pos_embed(reference.pos_embed.detach(), (24, 24), (14, 14), 1)
    torch.testing.assert_close(vit.pos_embed.weight.detach(), expected)


def test_own_and_detector_checkpoints_load(tmp_path):
    source = ViT(arch=MINI)
    randomize_(source)
    own, detector = str(tmp_path / 'own.pth'), str(tmp_path / 'detector.pth')
    torch.save(source.state_dict(), own)
    torch.save({'meta': {}, 'state_dict': {f'backbone.{k}': v for k, v in
                                           source.state_dict().items()}}, detector)
    for path in (own, detector):
        vit = ViT(arch=MINI, init_cfg=dict(type='Pretrained', checkpoint=path))
        vit.init_weights()
        for key, value in source.state_dict().items():
            assert torch.equal(vit.state_dict()[key], value), key


def test_wrong_checkpoint_names_the_keys(timm, tmp_path):
    assert_timm_checkpoint_is_refused(timm, tmp_path, ViT, 'tnt_s_patch16_224',
                                      r'missing from the checkpoint: .*layers\.0\.attn\.qkv')
    assert_timm_checkpoint_is_refused(timm, tmp_path, ViT, 'vit_tiny_patch16_224',
                                      r'shape .*layers\.0\.attn\.proj\.weight \(192, 192\)')


@pytest.mark.parametrize('kwargs, argument', [
    (dict(patch_size=15), 'patch_size'),
    (dict(patch_size=16, pretrain_img_size=200), 'pretrain_img_size'),
    (dict(arch=dict(MINI, num_heads=3)), 'num_heads'),
    (dict(arch='huge'), 'arch'),
    (dict(arch=dict(embed_dims=64)), 'arch'),
    (dict(out_indices=(3, )), 'out_indices'),
    (dict(out_indices=(-4, )), 'out_indices'),
    (dict(frozen_stages=4), 'frozen_stages'),
    (dict(drop_path_rate=1.0), 'drop_path_rate'),
    (dict(interpolate_mode='area'), 'mode'),
])
def test_rejects_bad_arguments(kwargs, argument):
    kwargs = {'arch': MINI, **kwargs}
    with pytest.raises(ValueError, match=argument):
        ViT(**kwargs)


def test_synthetic_shapes_config_trains_and_evaluates(tmp_path):
    assert_config_trains_and_evaluates(
        'configs/vit/faster-rcnn_vit-t6_sfp_1xb8-4e_synthetic-shapes.py', tmp_path, ViT,
        lambda vit: vit.layers[0].attn.qkv.weight)

