import logging
import os.path as osp

import pytest
import torch
from _helpers import REPO_ROOT as ROOT
from _helpers.backbones import num_params
from mmdet.models.backbones import ResNet
from mmdet.registry import MODELS
from mmengine.config import Config
from mmengine.logging import MMLogger

import mmdet_detrx  # noqa: F401
from mmdet_detrx.models.backbones.botnet import BoTBlock, BoTNet
from mmdet_detrx.models.layers.bottleneck_attention import BottleneckAttention

# A stride-2 BoT block's tensors, in state-dict order, as BoTNet checkpoints have always
# stored them: mmdet's Bottleneck without conv2, then the attention under `mhsa`.
BOT_BLOCK_KEYS = [
    'conv1.weight', *(f'bn1.{k}' for k in ('weight', 'bias', 'running_mean', 'running_var',
                                           'num_batches_tracked')),
    *(f'bn2.{k}' for k in ('weight', 'bias', 'running_mean', 'running_var',
                           'num_batches_tracked')),
    'conv3.weight', *(f'bn3.{k}' for k in ('weight', 'bias', 'running_mean', 'running_var',
                                           'num_batches_tracked')),
    'downsample.0.weight', *(f'downsample.1.{k}' for k in ('weight', 'bias', 'running_mean',
                                                           'running_var', 'num_batches_tracked')),
    'mhsa.pos_h', 'mhsa.pos_w', 'mhsa.qkv.weight',
]


def test_bot_block_keys_are_the_checkpoint_layout_and_load_strictly():
    torch.manual_seed(0)
    bot = BoTNet(depth=50, stem_channels=16, base_channels=16)
    assert list(bot.layer4[0].state_dict()) == BOT_BLOCK_KEYS
    no_shortcut = [k for k in BOT_BLOCK_KEYS if not k.startswith('downsample.')]
    assert [list(bot.layer4[i].state_dict()) for i in (1, 2)] == [no_shortcut] * 2
    # conv2 is the attention step, not a module: no `conv2.*` tensor, no duplicate of mhsa's.
    assert not any('conv2' in name for name, _ in bot.layer4.named_modules())
    other = BoTNet(depth=50, stem_channels=16, base_channels=16)
    other.load_state_dict(bot.state_dict(), strict=True)
    for key, value in bot.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key


@pytest.mark.parametrize('stride', [1, 2])
def test_bot_block_is_the_bottleneck_with_attention_for_its_3x3_conv(stride):
    torch.manual_seed(0)
    bot = BoTNet(depth=50, stem_channels=16, base_channels=16, strides=(1, 2, 2, stride))
    bot.init_weights()
    for block in bot.layer4:  # BN statistics that are not the identity
        block.bn2.running_mean.normal_(), block.bn2.running_var.uniform_(0.5, 2.0)
    bot.eval()
    block = bot.layer4[0]
    relu = torch.nn.functional.relu
    x = torch.randn(2, 256, 13, 9)
    with torch.no_grad():
        out = relu(block.bn1(block.conv1(x)))
        out = block.mhsa(out)
        out = torch.nn.functional.avg_pool2d(out, 2, ceil_mode=True) if stride == 2 else out
        out = block.bn3(block.conv3(relu(block.bn2(out))))
        expected = relu(out + block.downsample(x))
        assert torch.equal(block(x), expected)
    assert expected.shape == (2, 512, (13 + stride - 1) // stride, (9 + stride - 1) // stride)


def test_registered_and_parameter_count():
    bot50 = MODELS.build(dict(type='BoTNet', depth=50))
    r50 = ResNet(depth=50)
    # Paper: 20.8M vs 25.5M with the 2.05M-parameter 1000-class fc; without it 18.8M vs 23.5M.
    assert abs(num_params(r50) - 23.5e6) / 23.5e6 < 0.01
    assert abs(num_params(bot50) - 18.8e6) / 18.8e6 < 0.03
    blocks = [m for m in bot50.modules() if isinstance(m, BoTBlock)]
    assert len(blocks) == 3 and all(b in bot50.layer4.modules() for b in blocks)
    assert not any(isinstance(m, BoTBlock) for m in bot50.layer3.modules())


@pytest.mark.parametrize('size', [(800, 1216), (608, 1000), (513, 771)])
def test_output_shapes_equal_resnet(size):
    # Spatial sizes depend only on depth and strides: narrow (1/4-width) BoT50/R50 keep the
    # test fast on CPU; the full-width channels are checked below at a small size.
    narrow = dict(depth=50, stem_channels=16, base_channels=16)
    bot50, r50 = BoTNet(**narrow), ResNet(**narrow)
    bot50.eval(), r50.eval()  # mmdet's ResNet.train() returns None
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        bot_outs, res_outs = bot50(x), r50(x)
    assert [o.shape for o in bot_outs] == [o.shape for o in res_outs]
    strides = [(size[0] + s - 1) // s for s in (4, 8, 16, 32)]
    assert [o.shape[2] for o in bot_outs] == strides


def test_full_width_output_channels():
    bot50, r50 = BoTNet(depth=50), ResNet(depth=50)
    bot50.eval(), r50.eval()
    x = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        bot_outs, res_outs = bot50(x), r50(x)
    assert [o.shape for o in bot_outs] == [o.shape for o in res_outs]
    assert [o.shape[1] for o in bot_outs] == [256, 512, 1024, 2048]


def test_s1_keeps_c5_at_stride_16():
    bot = BoTNet(depth=50, s1=True, out_indices=(2, 3))
    bot.eval()
    with torch.no_grad():
        c4, c5 = bot(torch.randn(1, 3, 224, 320))
    assert c4.shape[-2:] == c5.shape[-2:] == (224 // 16, 320 // 16)
    assert c5.shape[1] == 2048
    assert bot.layer4[0].pool.__class__ is torch.nn.Identity


@pytest.mark.parametrize('pos_embed', ['relative', 'absolute', 'none'])
def test_c4_and_c5_stages_any_size(pos_embed):
    bot = BoTNet(depth=50, bot_stages=(2, 3), pos_embed=pos_embed, max_size=8, num_heads=8,
                 stem_channels=16, base_channels=16)
    assert all(isinstance(b, BoTBlock) for b in [*bot.layer3, *bot.layer4])
    assert not any(isinstance(b, BoTBlock) for b in [*bot.layer1, *bot.layer2])
    assert bot.layer3[0].mhsa.num_heads == 8 and bot.layer3[0].mhsa.pos_embed == pos_embed
    bot.init_weights()
    bot.eval()
    for size in [(97, 161), (320, 288)]:  # c4 up to 20x18 > max_size: clipped offsets
        with torch.no_grad():
            outs = bot(torch.randn(1, 3, *size))
        assert outs[-1].shape[-2:] == ((size[0] + 31) // 32, (size[1] + 31) // 32)
        assert all(torch.isfinite(o).all() for o in outs)


def test_resnet_checkpoint_loads_every_kept_layer(tmp_path):
    torch.manual_seed(0)
    r50 = ResNet(depth=50)
    r50.init_weights()
    resnet_state = r50.state_dict()
    # torchvision checkpoints share mmdet's names and add the classifier.
    checkpoint = {**resnet_state, 'fc.weight': torch.randn(1000, 2048), 'fc.bias': torch.zeros(1000)}
    path = str(tmp_path / 'resnet50.pth')
    torch.save(checkpoint, path)

    bot50 = BoTNet(depth=50, init_cfg=dict(type='Pretrained', checkpoint=path))
    logger = MMLogger.get_current_instance()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        bot50.init_weights()
    finally:
        logger.removeHandler(handler)
    bot_state = bot50.state_dict()
    new_keys, dropped_keys = bot50.resnet_key_diff()

    assert set(new_keys) == set(bot_state) - set(resnet_state)
    assert set(dropped_keys) == set(resnet_state) - set(bot_state)
    assert set(new_keys) == {f'layer4.{i}.mhsa.{name}' for i in range(3)
                             for name in ('qkv.weight', 'pos_h', 'pos_w')}
    assert set(dropped_keys) == {f'layer4.{i}.conv2.weight' for i in range(3)}
    report = [r.getMessage() for r in records if r.getMessage().startswith('BoTNet:')]
    assert len(report) == 1 and all(key in report[0] for key in new_keys + dropped_keys)
    for key in set(bot_state) & set(resnet_state):
        assert torch.equal(bot_state[key], resnet_state[key]), key
    # The new attention tensors are initialised, not left at zero.
    for key in new_keys:
        assert bot_state[key].std() > 0, key


def test_frozen_stages_and_norm_eval():
    bot = BoTNet(depth=50, frozen_stages=1, norm_eval=True)
    bot.train()
    assert not any(p.requires_grad for p in bot.layer1.parameters())
    assert all(p.requires_grad for p in bot.layer4.parameters())
    assert not bot.layer4[0].bn2.training  # norm_eval keeps BN statistics frozen


def test_with_cp_gives_same_gradients():
    torch.manual_seed(0)
    kwargs = dict(depth=50, base_channels=16, num_stages=4, out_indices=(3, ), norm_eval=False,
                  norm_cfg=dict(type='GN', num_groups=4))
    plain, checkpointed = BoTNet(**kwargs), BoTNet(with_cp=True, **kwargs)
    plain.init_weights()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 96, 64)
    for model in (plain, checkpointed):
        model(x)[0].square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_bfloat16_autocast():
    bot = BoTNet(depth=50, base_channels=16, out_indices=(3, ))
    bot.eval()
    x = torch.randn(1, 3, 160, 224)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out = bot(x)[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize('kwargs, argument', [
    (dict(depth=34), 'depth'),
    (dict(depth=200), 'depth'),
    (dict(depth=50, num_heads=3), 'num_heads'),
    (dict(depth=50, bot_stages=(4, )), 'bot_stages'),
    (dict(depth=50, bot_stages=(-1, )), 'bot_stages'),
    (dict(depth=50, num_stages=3, bot_stages=(3, ), out_indices=(0, 1, 2),
          strides=(1, 2, 2), dilations=(1, 1, 1)), 'bot_stages'),
    (dict(depth=50, pos_embed='learned'), 'pos_embed'),
    (dict(depth=50, dcn=dict(type='DCNv2', deform_groups=1),
          stage_with_dcn=(False, False, False, True)), 'dcn'),
])
def test_rejects_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        BoTNet(**kwargs)


def test_attention_is_the_only_new_module():
    bot = BoTNet(depth=50)
    attn = [m for m in bot.modules() if isinstance(m, BottleneckAttention)]
    assert len(attn) == 3
    assert all(m.num_heads == 4 and m.pos_embed == 'relative' for m in attn)
    assert bot.layer4[0].mhsa.embed_dims == 512


def test_mask_rcnn_bot50_train_step_on_synthetic_shapes(tmp_path):
    from mmdet.utils import register_all_modules
    from mmengine.optim import build_optim_wrapper
    from mmengine.runner import Runner
    register_all_modules(init_default_scope=True)

    cfg = Config.fromfile(
        osp.join(ROOT, 'configs/botnet/mask-rcnn_bot50_fpn_1xb8-12e_synthetic-shapes.py'))
    loader_cfg = cfg.train_dataloader
    loader_cfg.update(batch_size=2, num_workers=0, persistent_workers=False)
    loader_cfg.dataset.update(
        data_root=str(tmp_path / 'shapes'),
        spec=dict(seed=0, num_train=4, num_val=2, image_size=(128, 96), max_objects=3))
    loader = Runner.build_dataloader(loader_cfg)
    model = MODELS.build(cfg.model)
    model.init_weights()
    assert isinstance(model.backbone, BoTNet)
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    qkv = model.backbone.layer4[0].mhsa.qkv.weight
    qkv_before = qkv.detach().clone()

    losses = model.train_step(next(iter(loader)), optim_wrapper)

    assert {'loss_rpn_cls', 'loss_cls', 'loss_bbox', 'loss_mask'} <= set(losses)
    assert all(torch.isfinite(v).all() for v in losses.values())
    assert not torch.equal(qkv.detach(), qkv_before)  # the attention was trained


def test_query_chunk_size_reaches_every_block_and_keeps_outputs_and_keys():
    torch.manual_seed(0)
    kwargs = dict(depth=50, stem_channels=16, base_channels=16, out_indices=(3, ))
    whole = BoTNet(query_chunk_size=None, **kwargs)
    whole.init_weights()
    chunked = BoTNet(query_chunk_size=8, **kwargs)
    assert list(chunked.state_dict()) == list(whole.state_dict())
    chunked.load_state_dict(whole.state_dict(), strict=True)
    assert all(m.query_chunk_size == 8 for m in chunked.modules()
               if isinstance(m, BottleneckAttention))
    whole.eval(), chunked.eval()
    x = torch.randn(1, 3, 160, 224)  # first c5 block attends over 10 x 14 tokens
    with torch.no_grad():
        torch.testing.assert_close(chunked(x)[0], whole(x)[0], rtol=1e-4, atol=1e-5)
