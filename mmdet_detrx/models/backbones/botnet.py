"""BoTNet: ResNet whose last bottleneck blocks use multi-head self-attention.

Srinivas et al., "Bottleneck Transformers for Visual Recognition", CVPR 2021
(https://arxiv.org/abs/2101.11605). In every block of the chosen stages (default: c5) the
3x3 convolution becomes :class:`BottleneckAttention` (4 heads, 2D relative positions, no output
projection; BN and ReLU kept); a stride-2 block pools 2x2 after the attention.

Everything else is mmdet's ``ResNet`` with its parameter names, so an ImageNet ResNet
checkpoint (torchvision or mmdet) initialises every kept layer; see
:meth:`BoTNet.resnet_key_diff` for what it cannot provide.

Shapes: input ``(B, 3, H, W)`` of any size; outputs are those of ResNet of the same
``depth``/``strides`` (stage ``i`` has ``256 * 2**i`` channels at stride ``4 * 2**i``, or 16 for
c5 of BoTNet-S1).
"""
import torch.nn as nn
from mmengine.logging import print_log

from mmdet.models.backbones.resnet import Bottleneck, ResNet
from mmdet.registry import MODELS
from ..layers.bottleneck_attention import BottleneckAttention

__all__ = ['BoTBlock', 'BoTNet']


class BoTBlock(Bottleneck):
    """ResNet bottleneck with ``conv2`` replaced by :class:`BottleneckAttention`.

    ``conv1``/``norm1``/``norm2``/``conv3``/``norm3``/``downsample`` keep mmdet's names, so they
    load from a ResNet checkpoint; the new tensors live under ``mhsa``. With stride 2 the map is
    average-pooled 2x2 after the attention (``ceil_mode`` so odd sizes give ``ceil(H / 2)``, as
    ResNet's 3x3 stride-2 convolution does).
    """

    def __init__(self,
                 inplanes,
                 planes,
                 num_heads=4,
                 pos_embed='relative',
                 max_size=64,
                 query_chunk_size=1024,
                 **kwargs):
        if kwargs.get('dcn') is not None:
            raise ValueError('dcn cannot be combined with BoT blocks (they have no conv2)')
        super().__init__(inplanes, planes, **kwargs)
        if self.conv2_stride not in (1, 2):
            raise ValueError(f'stride must be 1 or 2 in a BoT block, got {self.conv2_stride}')
        del self.conv2  # the 3x3 convolution; the name now resolves to the method below
        self.mhsa = BottleneckAttention(
            planes, num_heads=num_heads, pos_embed=pos_embed, max_size=max_size,
            query_chunk_size=query_chunk_size)
        self.pool = (nn.AvgPool2d(2, ceil_mode=True)
                     if self.conv2_stride == 2 else nn.Identity())

    def conv2(self, x):
        """``Bottleneck.forward``'s ``conv2`` step in a BoT block: attention, then the pool.

        A method, not a submodule, so the attention's tensors keep their ``mhsa.*`` names;
        ``__init__`` deletes the 3x3 convolution that ``Bottleneck.__init__`` registers under
        this name. Everything around it (``norm2``, ReLU, plugins, ``conv3``, the shortcut,
        ``with_cp``) is mmdet's ``Bottleneck.forward``.
        """
        return self.pool(self.mhsa(x))


@MODELS.register_module()
class BoTNet(ResNet):
    """BoTNet backbone: mmdet's ResNet with BoT blocks in ``bot_stages``.

    Args:
        depth (int): 50, 101 or 152.
        bot_stages (Sequence[int]): stages (0 = c2 ... 3 = c5) whose blocks all become BoT
            blocks. Default: ``(3,)``, the paper's BoT50/101/152. ``(2, 3)`` adds c4.
        num_heads (int): attention heads; must divide each BoT stage's width
            (``base_channels * 2**stage``, 512 for c5). Default: 4.
        pos_embed (str): ``'relative'`` (paper), ``'absolute'`` or ``'none'``.
        max_size (int): feature-map side the position tables cover exactly; relative offsets
            beyond are clipped, so any input size runs. Default: 64 (2048 px at stride 32).
        s1 (bool): BoTNet-S1, c5 keeps stride 1 (output stride 16). Default: False.
        query_chunk_size (int, optional): most queries each attention processes at once
            (whole feature-map rows); bounds its quadratic buffers, same outputs, no
            parameters. ``None``: all at once. Default: 1024.
        **kwargs: mmdet ``ResNet`` arguments (``num_stages``, ``out_indices``,
            ``frozen_stages``, ``norm_cfg``, ``norm_eval``, ``with_cp``, ``strides``,
            ``init_cfg``, ...).
    """

    def __init__(self,
                 depth,
                 bot_stages=(3, ),
                 num_heads=4,
                 pos_embed='relative',
                 max_size=64,
                 s1=False,
                 query_chunk_size=1024,
                 **kwargs):
        if depth not in (50, 101, 152):
            raise ValueError(f'depth must be 50, 101 or 152 for BoTNet, got {depth!r}')
        num_stages = kwargs.get('num_stages', 4)
        bot_stages = tuple(bot_stages)
        for stage in bot_stages:
            if not isinstance(stage, int) or not 0 <= stage < num_stages:
                raise ValueError(f'bot_stages={bot_stages} must hold stage indices in '
                                 f'[0, {num_stages - 1}] (num_stages={num_stages})')
        base_channels = kwargs.get('base_channels', 64)
        for stage in bot_stages:
            width = base_channels * 2**stage
            if not isinstance(num_heads, int) or num_heads <= 0 or width % num_heads:
                raise ValueError(f'num_heads={num_heads!r} must divide the {width} channels '
                                 f'of BoT stage {stage}')
        if s1:
            if num_stages != 4:
                raise ValueError(f's1=True needs num_stages=4, got {num_stages}')
            strides = tuple(kwargs.get('strides', (1, 2, 2, 2)))
            kwargs['strides'] = strides[:3] + (1, )
        self.bot_stages = bot_stages
        self.bot_cfg = dict(num_heads=num_heads, pos_embed=pos_embed, max_size=max_size,
                            query_chunk_size=query_chunk_size)
        super().__init__(depth, **kwargs)

    def make_res_layer(self, **kwargs):
        # ResNet builds stage i with planes = base_channels * 2**i.
        stage = (kwargs['planes'] // self.base_channels).bit_length() - 1
        if stage in self.bot_stages:
            kwargs.update(block=BoTBlock, **self.bot_cfg)
        return super().make_res_layer(**kwargs)

    def resnet_key_diff(self):
        """How this backbone's state dict differs from a ResNet's of the same depth.

        Returns:
            tuple[list[str], list[str]]: ``(new_keys, dropped_keys)``: tensors a ResNet
            checkpoint cannot provide (the attention's, initialised from scratch) and ResNet
            tensors BoTNet does not have (the replaced ``conv2`` weights).
        """
        new_keys, dropped_keys = [], []
        for name, module in self.named_modules():
            if isinstance(module, BoTBlock):
                new_keys += [f'{name}.mhsa.{key}' for key in module.mhsa.state_dict()]
                dropped_keys.append(f'{name}.conv2.weight')
        return new_keys, dropped_keys

    def init_weights(self):
        super().init_weights()
        init_cfgs = self.init_cfg if isinstance(self.init_cfg, list) else [self.init_cfg]
        if any(cfg and cfg.get('type') == 'Pretrained' for cfg in init_cfgs):
            new_keys, dropped_keys = self.resnet_key_diff()
            print_log(
                f'BoTNet: {len(new_keys)} attention tensors are not in a ResNet checkpoint '
                f'and keep their fresh initialisation: {", ".join(new_keys)}; '
                f'{len(dropped_keys)} ResNet tensors are replaced by attention and not used: '
                f'{", ".join(dropped_keys)}',
                logger='current')
