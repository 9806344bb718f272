"""ViT (Vision Transformer) as a detection backbone: any input size, timm checkpoints.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at
Scale", ICLR 2021 (https://arxiv.org/abs/2010.11929). The image is cut into ``patch_size``
patches (zero-padded at the bottom/right to whole patches), each linearly embedded; a class
token is prepended, learned absolute position embeddings are added (interpolated bicubically
from the pretraining grid for other grids, see :class:`AbsolutePositionEmbedding`) and
``num_layers`` pre-norm transformer blocks follow. The class token takes part in attention
(as in pretraining) but is not in the outputs.

``arch='tiny'|'small'|'base'`` are the architectures of timm's ``vit_{tiny,small,base}_
patch16_224``, whose state dicts load through ``init_cfg=dict(type='Pretrained',
checkpoint=PATH)`` (keys converted by :meth:`ViT.convert_checkpoint`).

Shapes: input ``(B, 3, H, W)`` of any size; each output ``(B, C, ceil(H / p), ceil(W / p))``
(stride ``p = patch_size``). Use a neck such as ``SimpleFeaturePyramid`` for multi-scale maps.
"""
import os.path as osp
import re
from functools import partial
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
from mmcv.cnn import build_norm_layer
from mmcv.cnn.bricks.transformer import PatchEmbed
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmengine.runner.checkpoint import CheckpointLoader

from mmdet.registry import MODELS
from ..layers.pos_embed import AbsolutePositionEmbedding, resize_pos_embed
from ..layers.vit_block import ViTBlock

__all__ = ['ViT', 'load_converted_checkpoint']


def to_2tuple(value, name: str) -> Tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f'{name} must be a positive int or a pair of them, got {value!r}')
    return pair


def normalize_out_indices(out_indices: Sequence[int], num_layers: int) -> Tuple[int, ...]:
    """Block indices (negative counting from the end) -> sorted non-negative indices."""
    if isinstance(out_indices, int):
        out_indices = (out_indices, )
    indices = []
    for index in out_indices:
        if not isinstance(index, int) or not -num_layers <= index < num_layers:
            raise ValueError(f'out_indices={tuple(out_indices)} must hold block indices in '
                             f'[{-num_layers}, {num_layers - 1}] (num_layers={num_layers})')
        indices.append(index % num_layers)
    if not indices:
        raise ValueError('out_indices must not be empty')
    return tuple(sorted(set(indices)))


def _read_state_dict(checkpoint: str) -> Dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, unwrapped from ``state_dict``/``model`` and prefixes.

    Local files are read with ``weights_only=True``: loading a checkpoint runs no code from it.
    """
    if osp.isfile(osp.expanduser(checkpoint)):
        data = torch.load(osp.expanduser(checkpoint), map_location='cpu', weights_only=True)
    else:
        data = CheckpointLoader.load_checkpoint(checkpoint, map_location='cpu')
    for wrapper in ('state_dict', 'model', 'module'):
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
    if not isinstance(data, dict) or not data:
        raise ValueError(f'{checkpoint} holds no state dict')
    state = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if all(k.startswith('module.') for k in state):
        state = {k[len('module.'):]: v for k, v in state.items()}
    if any(k.startswith('backbone.') for k in state):  # a whole-detector checkpoint
        state = {k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')}
    return state


def _summarize(keys: List[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f' ... ({len(keys) - limit} more)' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


def load_converted_checkpoint(model: nn.Module, checkpoint: str,
                              convert: Callable[[Dict[str, torch.Tensor]],
                                                Tuple[Dict[str, torch.Tensor], List[str]]]):
    """Load ``checkpoint`` into ``model`` after ``convert`` (to the model's key names), strictly.

    ``convert(state)`` returns ``(state in the model's names, keys deliberately dropped)``.
    Every model tensor must be provided with its shape (the position table may come from
    another grid and is then resized); anything else is an error naming the keys.
    """
    name = type(model).__name__
    state, dropped = convert(_read_state_dict(checkpoint))
    own = model.state_dict()
    pos_key = 'pos_embed.weight'
    if pos_key in state and pos_key in own and state[pos_key].shape != own[pos_key].shape:
        state[pos_key] = _resize_checkpoint_pos_embed(state[pos_key], model, checkpoint)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [f'{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}'
                   for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong_shape:
        problems = []
        if missing:
            problems.append(f'missing from the checkpoint: {_summarize(missing)}')
        if unexpected:
            problems.append(f'not in {name}: {_summarize(unexpected)}')
        if wrong_shape:
            problems.append(f'shape (checkpoint vs model): {_summarize(wrong_shape)}')
        raise ValueError(f'{checkpoint} does not match this {name} (another architecture?): '
                         + '; '.join(problems))
    model.load_state_dict(state, strict=True)
    note = f'; dropped {_summarize(dropped)}' if dropped else ''
    print_log(f'{name}: loaded {len(state)} tensors from {checkpoint}{note}', logger='current')


def _resize_checkpoint_pos_embed(table: torch.Tensor, model: nn.Module, checkpoint: str):
    """A checkpoint position table of another (square) grid, resized to the model's."""
    pos = model.pos_embed
    extra = pos.num_extra_tokens
    side = int(round((table.shape[1] - extra) ** 0.5))
    if table.dim() != 3 or table.shape[2] != pos.embed_dims or side * side != table.shape[1] - extra:
        return table  # reported as a shape mismatch
    print_log(f'{type(model).__name__}: resizing the position embedding of {checkpoint} from '
              f'{side}x{side} to {pos.grid_size[0]}x{pos.grid_size[1]}', logger='current')
    return resize_pos_embed(table, (side, side), pos.grid_size, extra, pos.mode)


class TokenBackboneMixin:
    """What ViT and TNT share: argument checks, class token and positions, the loop's outputs,
    stage freezing, train mode, loading converted checkpoints.

    A subclass sets ``embed_dims`` and ``num_layers``, calls :meth:`_init_layout` and
    :meth:`_init_token_embeddings` in its constructor, and defines ``embedding_modules()``
    (everything before the blocks), ``layers``, ``norm`` and ``convert_checkpoint(state)``.
    """

    def _init_layout(self, patch_size: int, pretrain_img_size, out_indices: Sequence[int],
                     frozen_stages: int, with_cls_token: bool) -> None:
        """Check and keep the arguments about patches, outputs, freezing and the class token.

        Needs ``self.num_layers``; sets ``patch_size``, ``out_indices``, ``frozen_stages``,
        ``with_cls_token``, ``num_extra_tokens`` and ``pretrain_grid`` (the position table's).
        """
        num_layers = self.num_layers
        if not isinstance(patch_size, int) or patch_size <= 0:
            raise ValueError(f'patch_size must be a positive int, got {patch_size!r}')
        pretrain_img_size = to_2tuple(pretrain_img_size, 'pretrain_img_size')
        if any(side % patch_size for side in pretrain_img_size):
            raise ValueError(f'patch_size={patch_size} must divide pretrain_img_size='
                             f'{pretrain_img_size}: the position embedding is learnt on that grid')
        if not isinstance(frozen_stages, int) or not -1 <= frozen_stages <= num_layers:
            raise ValueError(f'frozen_stages must be in [-1, {num_layers}] (-1: nothing, 0: '
                             f'the embeddings, k: also blocks 0..k-1), got {frozen_stages!r}')
        self.patch_size = patch_size
        self.out_indices = normalize_out_indices(out_indices, num_layers)
        self.frozen_stages = frozen_stages
        self.with_cls_token = with_cls_token
        self.num_extra_tokens = int(with_cls_token)
        self.pretrain_grid = (pretrain_img_size[0] // patch_size,
                              pretrain_img_size[1] // patch_size)

    def _init_token_embeddings(self, init_cls_token: Callable[[torch.Tensor], None],
                               interpolate_mode: str, drop_rate: float) -> None:
        """The class token (if any, initialised in place by ``init_cls_token``), the position
        table on ``pretrain_grid`` and the dropout after it, in this order."""
        if self.with_cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, self.embed_dims))
            init_cls_token(self.cls_token)
        else:
            self.cls_token = None
        self.pos_embed = AbsolutePositionEmbedding(
            self.embed_dims, self.pretrain_grid, num_extra_tokens=self.num_extra_tokens,
            mode=interpolate_mode)
        self.drop_after_pos = nn.Dropout(drop_rate)

    def _add_token_embeddings(self, tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """Patch tokens (B, Hp*Wp, C) -> class token prepended, positions added, dropout."""
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return self.drop_after_pos(tokens + self.pos_embed(grid))  # (B, E + Hp*Wp, C)

    def _after_block(self, index: int, tokens: torch.Tensor, grid: Tuple[int, int],
                     outs: List[torch.Tensor]) -> torch.Tensor:
        """The final norm after the last block; block ``index``'s map appended to ``outs`` if
        it is an output. Returns the tokens the next block takes."""
        if index == self.num_layers - 1 and self.norm is not None:
            tokens = self.norm(tokens)
        if index in self.out_indices:
            outs.append(self._token_maps(tokens, grid))  # (B, C, Hp, Wp)
        return tokens

    def _frozen_modules(self) -> List[nn.Module]:
        if self.frozen_stages < 0:
            return []
        modules = list(self.embedding_modules()) + list(self.layers[:self.frozen_stages])
        if self.frozen_stages == len(self.layers) and self.norm is not None:
            modules.append(self.norm)
        return modules

    def _freeze_stages(self):
        for module in self._frozen_modules():
            if isinstance(module, nn.Parameter):
                module.requires_grad = False
                continue
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._frozen_modules():
            if isinstance(module, nn.Module):
                module.eval()  # frozen blocks run without dropout / drop-path
        return self

    def _token_maps(self, tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        batch, _, channels = tokens.shape
        patches = tokens[:, self.num_extra_tokens:]  # the class token is not a map position
        return patches.reshape(batch, *grid, channels).permute(0, 3, 1, 2).contiguous()

    def init_weights(self):
        init_cfg = self.init_cfg
        if isinstance(init_cfg, dict) and init_cfg.get('type') == 'Pretrained':
            checkpoint = init_cfg.get('checkpoint')
            if not checkpoint:
                raise ValueError(f"{type(self).__name__}: init_cfg type 'Pretrained' needs "
                                 f'a checkpoint, got {init_cfg}')
            load_converted_checkpoint(self, checkpoint, self.convert_checkpoint)
            self._is_init = True
        else:
            super().init_weights()
        self._freeze_stages()  # parameters loaded into frozen stages stay frozen


def init_linear_and_norm(module: nn.Module):
    """timm's initialisation: truncated-normal(0.02) Linear weights, zero biases, LN = 1/0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def rename_keys(state: Dict[str, torch.Tensor],
                rules: Sequence[Tuple[str, str]]) -> Dict[str, torch.Tensor]:
    """Apply the first matching ``(regex, replacement)`` rule to each key (unmatched: kept)."""
    renamed = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            new_key, count = re.subn(pattern, replacement, key)
            if count:
                key = new_key
                break
        renamed[key] = value
    return renamed


def timm_block_rules(norm1: str, attn: str, norm2: str, mlp: str,
                     block: str = '') -> Tuple[Tuple[str, str], ...]:
    """:func:`rename_keys` rules from one timm transformer block to a :class:`ViTBlock`.

    timm's ``blocks.{i}.{norm1,attn,norm2,mlp.fc1,mlp.fc2}.*`` (sub-module names as given)
    become ``layers.{i}.{block}{ln1,attn,ln2,ffn.layers.0.0,ffn.layers.1}.*``; ``block`` is
    the ViTBlock's place inside our layer (``'inner.'`` in TNT), empty for ViT.
    """
    pairs = ((norm1, 'ln1'), (attn, 'attn'), (norm2, 'ln2'),
             (mlp + r'\.fc1', 'ffn.layers.0.0'), (mlp + r'\.fc2', 'ffn.layers.1'))
    return tuple((rf'^blocks\.(\d+)\.{timm_name}\.', rf'layers.\1.{block}{ours}.')
                 for timm_name, ours in pairs)


# timm's ViT names -> ours (first match wins; anything unmatched is reported as unexpected).
_TIMM_VIT_RULES = (
    (r'^pos_embed$', 'pos_embed.weight'),
    (r'^patch_embed\.proj\.', 'patch_embed.projection.'),
    *timm_block_rules('norm1', 'attn', 'norm2', 'mlp'),
)
_CLASSIFIER_KEYS = re.compile(r'^(head|head_dist|fc_norm|pre_logits)\.')


def drop_classifier(state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    dropped = [k for k in state if _CLASSIFIER_KEYS.match(k)]
    return {k: v for k, v in state.items() if k not in dropped}, dropped


def drop_class_token(state: Dict[str, torch.Tensor], pos_key: str,
                     dropped: List[str]) -> Dict[str, torch.Tensor]:
    """For a model built with ``with_cls_token=False``: drop the checkpoint's class token."""
    if 'cls_token' in state:
        state = dict(state)
        del state['cls_token']
        dropped.append('cls_token')
        if pos_key in state:
            state[pos_key] = state[pos_key][:, 1:]
            dropped.append(f'{pos_key}[:, 0] (class token position)')
    return state


_ARCHS = {
    # timm's vit_{tiny,small,base}_patch16_224
    **dict.fromkeys(('t', 'tiny'), dict(embed_dims=192, num_layers=12, num_heads=3,
                                        feedforward_channels=768)),
    **dict.fromkeys(('s', 'small'), dict(embed_dims=384, num_layers=12, num_heads=6,
                                         feedforward_channels=1536)),
    **dict.fromkeys(('b', 'base'), dict(embed_dims=768, num_layers=12, num_heads=12,
                                        feedforward_channels=3072)),
}


def check_heads(arch: dict, dims_name: str, heads_name: str) -> None:
    """``arch[heads_name]`` must be a positive int dividing ``arch[dims_name]``."""
    dims, heads = arch[dims_name], arch[heads_name]
    if not isinstance(heads, int) or heads <= 0 or dims % heads:
        raise ValueError(f'{dims_name}={dims} must be divisible by {heads_name}={heads!r}')


def resolve_arch(arch, archs: Dict[str, dict], name: str) -> dict:
    if isinstance(arch, str):
        if arch.lower() not in archs:
            raise ValueError(f'arch={arch!r} is not a {name} architecture; choose one of '
                             f'{sorted(archs)} or give a dict with {sorted(next(iter(archs.values())))}')
        return dict(archs[arch.lower()])
    required = set(next(iter(archs.values())))
    if not isinstance(arch, dict) or not required <= set(arch):
        raise ValueError(f'a custom {name} arch must be a dict with keys {sorted(required)}, '
                         f'got {arch!r}')
    return {k: arch[k] for k in required}


@MODELS.register_module()
class ViT(TokenBackboneMixin, BaseModule):
    """Vision Transformer backbone for detection.

    Args:
        arch (str | dict): ``'tiny'``/``'t'``, ``'small'``/``'s'``, ``'base'``/``'b'`` (timm's
            ``vit_{tiny,small,base}_patch16_224``), or a dict with ``embed_dims``,
            ``num_layers``, ``num_heads``, ``feedforward_channels``. Default: ``'base'``.
        patch_size (int): patch side, the output stride. Default: 16.
        in_channels (int): image channels. Default: 3.
        pretrain_img_size (int | tuple[int, int]): image size the position embedding was
            learnt for; its grid is ``pretrain_img_size / patch_size`` (must divide). Default: 224.
        out_indices (Sequence[int]): blocks whose outputs are returned (negative: from the
            end). Default: ``(-1,)``, the last block after the final norm.
        qkv_bias (bool): bias in the qkv projections. Default: True.
        drop_rate (float): dropout after the embedding and in each block. Default: 0.
        attn_drop_rate (float): dropout on attention weights. Default: 0.
        drop_path_rate (float): stochastic depth of the last block, linearly increasing from
            0 at the first. Default: 0.
        with_cls_token (bool): keep a class token in the sequence (needed to reproduce a
            checkpoint that has one; never in the outputs). Default: True.
        final_norm (bool): LayerNorm after the last block. Default: True.
        norm_cfg (dict): norm layers. Default: ``dict(type='LN', eps=1e-6)`` (timm's).
        act_cfg (dict): FFN activation. Default: ``dict(type='GELU')``.
        interpolate_mode (str): position-embedding resizing. Default: ``'bicubic'``.
        frozen_stages (int): -1 freezes nothing, 0 the patch/position/class embeddings, k also
            blocks 0..k-1 (and the final norm when k = num_layers). Default: -1.
        with_cp (bool): activation checkpointing per block while training. Default: False.
        init_cfg (dict, optional): ``dict(type='Pretrained', checkpoint=PATH)`` loads a timm
            (or our own / a detector's) state dict, strictly after key conversion.
    """

    def __init__(self,
                 arch='base',
                 patch_size: int = 16,
                 in_channels: int = 3,
                 pretrain_img_size=224,
                 out_indices: Sequence[int] = (-1, ),
                 qkv_bias: bool = True,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.,
                 with_cls_token: bool = True,
                 final_norm: bool = True,
                 norm_cfg: dict = dict(type='LN', eps=1e-6),
                 act_cfg: dict = dict(type='GELU'),
                 interpolate_mode: str = 'bicubic',
                 frozen_stages: int = -1,
                 with_cp: bool = False,
                 init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        arch = resolve_arch(arch, _ARCHS, 'ViT')
        self.embed_dims = arch['embed_dims']
        self.num_layers = arch['num_layers']
        num_heads = arch['num_heads']
        self._init_layout(patch_size, pretrain_img_size, out_indices, frozen_stages,
                          with_cls_token)
        check_heads(arch, 'embed_dims', 'num_heads')

        self.patch_embed = PatchEmbed(
            in_channels=in_channels, embed_dims=self.embed_dims, conv_type='Conv2d',
            kernel_size=patch_size, stride=patch_size, padding='corner', bias=True)
        self._init_token_embeddings(partial(nn.init.normal_, std=1e-6), interpolate_mode,
                                    drop_rate)

        drop_path_rates = torch.linspace(0, drop_path_rate, self.num_layers).tolist()
        self.layers = nn.ModuleList([
            ViTBlock(self.embed_dims, num_heads, arch['feedforward_channels'],
                     qkv_bias=qkv_bias, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                     drop_path_rate=drop_path_rates[i], act_cfg=act_cfg, norm_cfg=norm_cfg,
                     with_cp=with_cp) for i in range(self.num_layers)
        ])
        self.norm = build_norm_layer(norm_cfg, self.embed_dims)[1] if final_norm else None
        self.layers.apply(init_linear_and_norm)
        self._freeze_stages()

    def embedding_modules(self):
        params = [self.cls_token] if self.cls_token is not None else []
        return [self.patch_embed, self.pos_embed, self.drop_after_pos, *params]

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        tokens, grid = self.patch_embed(x)  # (B, Hp*Wp, C), (Hp, Wp)
        tokens = self._add_token_embeddings(tokens, grid)  # (B, E + Hp*Wp, C)
        outs = []
        for i, layer in enumerate(self.layers):
            tokens = self._after_block(i, layer(tokens), grid, outs)
        return tuple(outs)

    def convert_checkpoint(self, state: Dict[str, torch.Tensor]):
        """A timm ``VisionTransformer`` (or our own) state dict -> this model's names.

        Returns ``(state, dropped_keys)``; the classifier (``head``) is dropped.
        """
        state, dropped = drop_classifier(state)
        if any(k.startswith('blocks.') or k.startswith('patch_embed.proj.') for k in state):
            state = rename_keys(state, _TIMM_VIT_RULES)
        if not self.with_cls_token:
            state = drop_class_token(state, 'pos_embed.weight', dropped)
        return state, dropped
