"""Checkpoints of the token backbones: timm's (or our own / a detector's) state dict, converted.

:func:`load_converted_checkpoint` reads a checkpoint through the package's safe loader
(:func:`~mmdet_detrx.utils.load_checkpoint_file` for a local file, which honours
``MMDET_DETRX_TRUSTED_CHECKPOINTS=1`` / ``--trust-checkpoint``; mmengine's ``CheckpointLoader``,
whose local and http(s) schemes are the same loader once ``mmdet_detrx`` is imported, for URLs
and other schemes), unwraps it (``state_dict`` / ``model`` / ``module``, ``module.`` and a
detector's ``backbone.`` prefixes), lets the model convert the keys, resizes a position table of
another grid and loads strictly, naming the keys that do not fit. The key rules
(:func:`rename_keys`, :func:`timm_block_rules`) map timm's module names to ours.
"""
import os.path as osp
import re
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.runner.checkpoint import CheckpointLoader

from ...utils.safe_checkpoint import load_checkpoint_file
from ..layers.pos_embed import resize_pos_embed

__all__ = ['drop_class_token', 'drop_classifier', 'load_converted_checkpoint',
           'read_state_dict', 'rename_keys', 'timm_block_rules']


def read_state_dict(checkpoint: str) -> Dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, unwrapped from ``state_dict``/``model`` and prefixes.

    A local file goes through the package's safe loader (:func:`load_checkpoint_file`: runs no
    code from the file, reads mmengine's own checkpoints, full pickle only when the user trusts
    checkpoints); anything else through mmengine's ``CheckpointLoader``.
    """
    if osp.isfile(osp.expanduser(checkpoint)):
        data = load_checkpoint_file(checkpoint, map_location='cpu')
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
    state, dropped = convert(read_state_dict(checkpoint))
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
