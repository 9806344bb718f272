"""What the original-repository layouts share (facebookresearch/detr, fundamentalvision/
Deformable-DETR, IDEA-Research/DINO, IDEA-Research/detrex).

* The training ``args`` those repositories pickle next to the weights (an ``argparse.Namespace``,
  read without running code: see ``_source.py``) give the hyper-parameters that no tensor shape
  holds (heads, sampling points, dilation, positional-encoding temperatures); without them the
  repositories' defaults apply and the notes say so.
* The backbones: a torchvision ResNet inside ``IntermediateLayerGetter`` (``backbone.0.body.*``:
  torchvision's names are mmdet's) or detectron2's ResNet (detrex: ``backbone.stem.conv1``,
  ``backbone.res2.0.conv1.norm``, ``shortcut``); both with frozen BatchNorm, which stores no
  ``num_batches_tracked`` (added as 0 and reported).
* COCO classes: these repositories train on COCO category ids (91 outputs: id 0 and 11 gaps are
  "N/A"), detrex on the 80 contiguous classes; :func:`compact_coco91` selects the 80 real ids.
* The heads the original code shares between the decoder and the detector: the duplicated keys
  (``transformer.decoder.bbox_embed.N`` = ``bbox_embed.N``) are checked equal and dropped.
"""
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ._registry import ConversionError, Source

__all__ = [
    'COCO80_CLASSES', 'COCO91_IDS', 'coco91_classes', 'class_names', 'training_args',
    'arg_or_default', 'count_indices', 'torchvision_resnet_rules', 'detectron2_resnet_rules',
    'resnet_spec', 'add_batch_counters', 'drop_aliases', 'refuse_keys', 'heads_and_points',
    'input_proj_rules', 'projection_channels', 'compact_coco91', 'equal_heads'
]

# mmdet's CocoDataset order (= ascending COCO category id).
COCO80_CLASSES = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat',
    'traffic light', 'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog',
    'horse', 'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe', 'backpack', 'umbrella',
    'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard', 'sports ball', 'kite',
    'baseball bat', 'baseball glove', 'skateboard', 'surfboard', 'tennis racket', 'bottle',
    'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple', 'sandwich',
    'orange', 'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch',
    'potted plant', 'bed', 'dining table', 'toilet', 'tv', 'laptop', 'mouse', 'remote',
    'keyboard', 'cell phone', 'microwave', 'oven', 'toaster', 'sink', 'refrigerator', 'book',
    'clock', 'vase', 'scissors', 'teddy bear', 'hair drier', 'toothbrush')
# The COCO category id of each of them: the rows of a 91-output classifier they occupy.
COCO91_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24,
              25, 27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49,
              50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74,
              75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90)


def coco91_classes() -> List[str]:
    """Names of a classifier indexed by COCO category id (0..90); the unused ids are 'N/A'."""
    names = ['N/A'] * 91
    for category_id, name in zip(COCO91_IDS, COCO80_CLASSES):
        names[category_id] = name
    return names


def class_names(num_classes: int, notes: List[str]) -> List[str]:
    """COCO's names for 91 (category-id layout) or 80 outputs, ``class_i`` otherwise."""
    if num_classes == 91:
        notes.append('91 class outputs indexed by COCO category id (id 0 and the 11 unused ids '
                     "are 'N/A'); --coco80 keeps the 80 real classes in mmdet's order "
                     '(CocoDataset/CocoMetric)')
        return coco91_classes()
    if num_classes == 80:
        notes.append("80 class outputs: named as mmdet's COCO classes (detrex's order)")
        return list(COCO80_CLASSES)
    notes.append(f'{num_classes} class outputs (not COCO): named class_0 .. '
                 f'class_{num_classes - 1}; set metainfo.classes in the config')
    return [f'class_{i}' for i in range(num_classes)]


# --------------------------------------------------------------------------- training args
def training_args(source: Source) -> Dict[str, object]:
    """The ``args`` the original training scripts save next to the weights, as a dict."""
    checkpoint = source.checkpoint
    args = checkpoint.get('args') if isinstance(checkpoint, dict) else None
    if args is None:
        return {}
    return dict(vars(args)) if hasattr(args, '__dict__') else dict(args)


def arg_or_default(args: Dict[str, object], name: str, default, notes: List[str], what: str):
    """``args[name]`` when the checkpoint has it, else ``default`` (with a note)."""
    if name in args and args[name] is not None:
        return args[name]
    notes.append(f'{what} is not stored in the weights and the checkpoint has no '
                 f'args.{name}: {default!r} assumed (the repository default)')
    return default


# ------------------------------------------------------------------------------- key tools
def count_indices(keys: Iterable[str], prefix: str) -> int:
    """How many ``prefix<N>.`` indices ``keys`` hold (prefix is a regex)."""
    found = {int(m[1]) for k in keys for m in [re.match(prefix + r'(\d+)\.', k)] if m}
    if found and found != set(range(len(found))):
        raise ConversionError(f'indices of {prefix!r} are not 0..{len(found) - 1}: '
                              f'{sorted(found)}')
    return len(found)


def refuse_keys(keys: Iterable[str], unsupported: Sequence[Tuple[str, str]]) -> None:
    """Raise naming the first key of an option our detectors do not have."""
    keys = list(keys)
    for pattern, what in unsupported:
        hits = [k for k in keys if re.fullmatch(pattern, k)]
        if hits:
            raise ConversionError(f'unsupported option: {what} (the checkpoint has '
                                  f'{", ".join(hits[:3])}); no mmdet counterpart')


def drop_aliases(weights: Dict[str, torch.Tensor], alias: str, primary: str,
                 notes: List[str]) -> None:
    """Remove ``alias``-prefixed keys that repeat ``primary``-prefixed ones (the same module
    registered twice, e.g. ``transformer.decoder.bbox_embed`` = ``bbox_embed``); raise if a
    copy differs or has no original."""
    dropped = []
    for key in [k for k in weights if k.startswith(alias)]:
        original = primary + key[len(alias):]
        if original not in weights:
            raise ConversionError(f'{key} has no counterpart {original}: the head modules '
                                  'must be shared between the decoder and the detector')
        if not torch.equal(weights[key], weights[original]):
            raise ConversionError(f'{key} differs from {original}: they must be the same '
                                  'module (shared head)')
        del weights[key]
        dropped.append(key)
    if dropped:
        notes.append(f'dropped {len(dropped)} keys {alias}* (the same modules as {primary}*, '
                     'checked equal)')


def equal_heads(weights: Dict[str, torch.Tensor], prefix: str, count: int) -> bool:
    """Whether ``prefix.0`` .. ``prefix.{count-1}`` hold identical tensors (a shared head)."""
    first = {k[len(f'{prefix}.0.'):]: v for k, v in weights.items()
             if k.startswith(f'{prefix}.0.')}
    for index in range(1, count):
        for suffix, value in first.items():
            other = weights.get(f'{prefix}.{index}.{suffix}')
            if other is None or not torch.equal(other, value):
                return False
    return True


def heads_and_points(weights: Dict[str, torch.Tensor], key: str, levels: int, heads: int,
                     points_arg: Optional[int], what: str) -> int:
    """Sampling points of a deformable attention from ``attention_weights``' rows
    (heads x levels x points); ``points_arg`` (the checkpoint's args), when given, must agree."""
    rows = weights[key].shape[0]
    if rows % (heads * levels):
        raise ConversionError(f'{key} has {rows} rows, not a multiple of {heads} heads x '
                              f'{levels} levels: give the right number of heads (args.nheads)')
    points = rows // (heads * levels)
    if points_arg is not None and int(points_arg) != points:
        raise ConversionError(f'{what}: args say {points_arg} sampling points, {key} holds '
                              f'{points} (with {heads} heads, {levels} levels)')
    return points


# ------------------------------------------------------------------------------- backbones
def torchvision_resnet_rules(prefix: str = 'backbone.0.body.') -> list:
    """torchvision ResNet (``IntermediateLayerGetter``: conv1, bn1, layerS.B.{convK,bnK,
    downsample.{0,1}}) -> mmdet ResNet: the same names under ``backbone.``."""
    return [(re.escape(prefix) + r'((?:conv1|bn1)\..+|layer[1-4]\.\d+\..+)', r'backbone.\1')]


def detectron2_resnet_rules(prefix: str = 'backbone.') -> list:
    """detectron2 ResNet (detrex) -> mmdet ResNet.

    ``stem.conv1`` (+ ``.norm``) is conv1/bn1; ``resS.B.convK`` (+ ``.norm``) is
    ``layer{S-1}.B.convK``/``bnK``; ``shortcut`` (+ ``.norm``) is ``downsample.0``/``.1``.
    """
    p = re.escape(prefix)
    bn = r'(weight|bias|running_mean|running_var)'
    return [
        (p + r'stem\.conv1\.weight', 'backbone.conv1.weight'),
        (p + rf'stem\.conv1\.norm\.{bn}', r'backbone.bn1.\1'),
        (p + r'res([2-5])\.(\d+)\.conv([1-3])\.weight',
         lambda m: f'backbone.layer{int(m[1]) - 1}.{m[2]}.conv{m[3]}.weight'),
        (p + rf'res([2-5])\.(\d+)\.conv([1-3])\.norm\.{bn}',
         lambda m: f'backbone.layer{int(m[1]) - 1}.{m[2]}.bn{m[3]}.{m[4]}'),
        (p + r'res([2-5])\.(\d+)\.shortcut\.weight',
         lambda m: f'backbone.layer{int(m[1]) - 1}.{m[2]}.downsample.0.weight'),
        (p + rf'res([2-5])\.(\d+)\.shortcut\.norm\.{bn}',
         lambda m: f'backbone.layer{int(m[1]) - 1}.{m[2]}.downsample.1.{m[3]}'),
    ]


_RESNET_DEPTHS = {('basic', (2, 2, 2, 2)): 18, ('basic', (3, 4, 6, 3)): 34,
                  ('bottleneck', (3, 4, 6, 3)): 50, ('bottleneck', (3, 4, 23, 3)): 101,
                  ('bottleneck', (3, 8, 36, 3)): 152}


def resnet_spec(state_dict: Dict[str, torch.Tensor], out_channels: Sequence[int],
                dilation: bool) -> Tuple[dict, int]:
    """mmdet backbone config (and depth) of the renamed ``backbone.*`` weights.

    ``out_channels``: the channels of the feature maps the detector takes (the input
    projections' ``in_channels``), which name the stages; ``dilation``: C5 dilated (DC5), as
    torchvision's ``replace_stride_with_dilation=[False, False, True]`` (first block of the
    stage at the previous dilation: ``TorchvisionResNet``).
    """
    blocks = tuple(count_indices(state_dict, rf'backbone\.layer{s}\.') for s in range(1, 5))
    kind = 'bottleneck' if any('.conv3.' in k for k in state_dict
                               if k.startswith('backbone.layer')) else 'basic'
    depth = _RESNET_DEPTHS.get((kind, blocks))
    if depth is None:
        raise ConversionError(f'the backbone is not a ResNet-18/34/50/101/152 ({kind} blocks '
                              f'per stage {list(blocks)})')
    stage_channels = [64 * (4 if kind == 'bottleneck' else 1) * 2**i for i in range(4)]
    try:
        out_indices = tuple(stage_channels.index(int(c)) for c in out_channels)
    except ValueError:
        raise ConversionError(f'input projections take {list(out_channels)} channels; a '
                              f'ResNet-{depth} gives {stage_channels}') from None
    strides, dilations = ((1, 2, 2, 1), (1, 1, 1, 2)) if dilation else ((1, 2, 2, 2),
                                                                         (1, 1, 1, 1))
    return dict(_delete_=True, type='TorchvisionResNet' if dilation else 'ResNet', depth=depth,
                num_stages=4, strides=strides, dilations=dilations, out_indices=out_indices,
                frozen_stages=1, norm_cfg=dict(type='BN', requires_grad=False), norm_eval=True,
                style='pytorch', init_cfg=None), depth


def add_batch_counters(state_dict: Dict[str, torch.Tensor], notes: List[str]) -> None:
    """mmdet's BatchNorm has ``num_batches_tracked``; frozen BatchNorm (HF's, the original
    repositories') stores none."""
    added = 0
    for key in [k for k in state_dict if k.startswith('backbone.') and k.endswith('.running_var')]:
        counter = key[:-len('running_var')] + 'num_batches_tracked'
        if counter not in state_dict:
            state_dict[counter] = torch.tensor(0, dtype=torch.long)
            added += 1
    if added:
        notes.append(f'added backbone.*.num_batches_tracked = 0 ({added} BatchNorm layers: '
                     'the source freezes BatchNorm and stores no counter; unused by frozen BN)')


def input_proj_rules(source_prefix: str, num_backbone_outs: int, conv: str = '0',
                     norm: str = '1') -> list:
    """``<source_prefix>L.<conv|norm>.{weight,bias}`` -> mmdet's ChannelMapper: levels below
    ``num_backbone_outs`` are ``neck.convs.L``, the rest ``neck.extra_convs.(L - outs)``;
    ConvModule names its GroupNorm ``gn``."""
    def rename(m):
        level, part = int(m[1]), 'conv' if m[2] == conv else 'gn'
        if level < num_backbone_outs:
            return f'neck.convs.{level}.{part}.{m[3]}'
        return f'neck.extra_convs.{level - num_backbone_outs}.{part}.{m[3]}'

    return [(re.escape(source_prefix) + rf'(\d+)\.({re.escape(conv)}|{re.escape(norm)})'
             r'\.(weight|bias)', rename)]


def projection_channels(weights: Dict[str, torch.Tensor], prefix: str, conv: str
                        ) -> Tuple[List[int], int]:
    """(in_channels of the 1x1 projections of backbone maps, number of 3x3 extra levels)."""
    levels = count_indices(weights, re.escape(prefix))
    channels, extra = [], 0
    for level in range(levels):
        weight = weights[f'{prefix}{level}.{conv}.weight']
        if weight.shape[-1] == 1:
            if extra:
                raise ConversionError(f'{prefix}{level} is a 1x1 projection after a 3x3 extra '
                                      'level: not a Deformable DETR input projection')
            channels.append(int(weight.shape[1]))
        else:
            extra += 1
    return channels, extra


# ----------------------------------------------------------------------------- COCO classes
def compact_coco91(state_dict: Dict[str, torch.Tensor], proposal_branch: Optional[int] = None,
                   background_last: bool = False) -> Dict[str, torch.Tensor]:
    """Keep the 80 real COCO ids of every classifier indexed by category id (91 rows; DETR's
    softmax head: 92, no-object last) and of DINO's denoising label embedding.

    ``proposal_branch``: the index of Deformable DETR's two-stage proposal classifier, which
    ranks the encoder's tokens by its column 0 only: its rows 0..79 are kept instead, so the
    proposals stay the same. Sigmoid heads then give exactly the source's scores for the 80
    classes; a softmax head renormalises over 81 instead of 92 entries (the dropped "N/A"
    logits are near -inf in a trained model, so scores change very little).
    """
    ids = torch.tensor(COCO91_IDS)
    out = dict(state_dict)
    for key, value in state_dict.items():
        match = re.fullmatch(r'bbox_head\.(?:cls_branches\.(\d+)|fc_cls)\.(weight|bias)', key)
        label = key == 'dn_query_generator.label_embedding.weight'
        if not (match or label):
            continue
        rows = value.shape[0] - (1 if background_last and key.startswith('bbox_head.fc_cls')
                                 else 0)
        if rows != 91:
            raise ConversionError(f'{key} has {rows} class rows, not 91 COCO category ids')
        if match and match[1] is not None and int(match[1]) == proposal_branch:
            out[key] = value[:80].clone()
        elif background_last and key.startswith('bbox_head.fc_cls'):
            out[key] = torch.cat([value[ids], value[-1:]]).clone()
        else:
            out[key] = value[ids].clone()
    return out
