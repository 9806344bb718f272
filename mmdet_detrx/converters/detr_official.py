"""facebookresearch/detr ``.pth`` (``{'model': state_dict, ...}``: DETR R50 / R101, and DC5)
-> ``DETRX`` (mmdet's DETR, ``mmdet::detr/detr_r50_8xb2-150e_coco.py``).

The two module trees side by side (the original's ``models/detr.py`` + ``transformer.py`` left,
mmdet's DETR right)::

    backbone.0.body.*  (torchvision ResNet)        backbone.*          (same names; DC5:
                                                                        TorchvisionResNet)
    backbone.1         (PositionEmbeddingSine)     positional_encoding (no parameters)
    input_proj         (Conv2d C5 -> d, 1x1)       neck.convs.0.conv   (ChannelMapper)
    query_embed                                    query_embedding
    transformer.encoder.layers.N.
        self_attn.{in_proj_*,out_proj}             encoder.layers.N.self_attn.attn.*
        norm1 / linear1 / linear2 / norm2          norms.0 / ffn.layers.0.0 / ffn.layers.1 /
                                                   norms.1
    transformer.decoder.layers.N.
        self_attn.*      / norm1                   decoder.layers.N.self_attn.attn.* / norms.0
        multihead_attn.* / norm2                   cross_attn.attn.*                 / norms.1
        linear1 / linear2 / norm3                  ffn.layers.0.0 / ffn.layers.1 / norms.2
    transformer.decoder.norm                       decoder.post_norm
    class_embed        (num_classes + 1, no-object last, softmax)    bbox_head.fc_cls
    bbox_embed.layers.{0,1,2}                      bbox_head.reg_ffn.layers.{0.0,1}, fc_reg

Both are post-norm transformers (``normalize_before=False``; a pre-norm checkpoint is refused),
add positions to queries and keys only, normalise every decoder output with the final LayerNorm
and predict ``sigmoid(MLP(h))`` boxes. The panoptic model (``detr.``-prefixed weights with
``bbox_attention``/``mask_head``) converts as its detector; the mask head is dropped by name.

R50 and R50-DC5 weights have the same shapes: DC5 is read from ``args.dilation`` when the
checkpoint has its args, else from ``dc5`` in the file name, else it is not assumed; name the
layout ``detr-official-dc5`` (``--from``) to force it. Attention heads (``args.nheads``) are not
in the shapes either: 8 (the repository default) when the args are missing.
"""
import os.path as osp
import re
from typing import List

from ._original_common import (add_batch_counters, arg_or_default, class_names, count_indices,
                               refuse_keys, resnet_spec, torchvision_resnet_rules,
                               training_args)
from ._registry import (ConversionError, Converted, Layout, LayoutMatch, Source,
                        apply_key_rules, match_key_patterns, register_layout)

__all__ = ['DETR_RULES', 'OfficialDetrLayout', 'OfficialDetrDC5Layout', 'convert_official_detr']

_W = r'(weight|bias)'
_ENC = r'transformer\.encoder\.layers\.(\d+)'
_DEC = r'transformer\.decoder\.layers\.(\d+)'

DETR_RULES = [
    *torchvision_resnet_rules('backbone.0.body.'),
    (rf'input_proj\.{_W}', r'neck.convs.0.conv.\1'),
    (r'query_embed\.weight', 'query_embedding.weight'),
    (_ENC + rf'\.self_attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)',
     r'encoder.layers.\1.self_attn.attn.\2'),
    (_ENC + rf'\.norm1\.{_W}', r'encoder.layers.\1.norms.0.\2'),
    (_ENC + rf'\.linear1\.{_W}', r'encoder.layers.\1.ffn.layers.0.0.\2'),
    (_ENC + rf'\.linear2\.{_W}', r'encoder.layers.\1.ffn.layers.1.\2'),
    (_ENC + rf'\.norm2\.{_W}', r'encoder.layers.\1.norms.1.\2'),
    (_DEC + rf'\.self_attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)',
     r'decoder.layers.\1.self_attn.attn.\2'),
    (_DEC + rf'\.multihead_attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)',
     r'decoder.layers.\1.cross_attn.attn.\2'),
    (_DEC + rf'\.norm1\.{_W}', r'decoder.layers.\1.norms.0.\2'),
    (_DEC + rf'\.norm2\.{_W}', r'decoder.layers.\1.norms.1.\2'),
    (_DEC + rf'\.norm3\.{_W}', r'decoder.layers.\1.norms.2.\2'),
    (_DEC + rf'\.linear1\.{_W}', r'decoder.layers.\1.ffn.layers.0.0.\2'),
    (_DEC + rf'\.linear2\.{_W}', r'decoder.layers.\1.ffn.layers.1.\2'),
    (rf'transformer\.decoder\.norm\.{_W}', r'decoder.post_norm.\1'),
    (rf'class_embed\.{_W}', r'bbox_head.fc_cls.\1'),
    (rf'bbox_embed\.layers\.0\.{_W}', r'bbox_head.reg_ffn.layers.0.0.\1'),
    (rf'bbox_embed\.layers\.1\.{_W}', r'bbox_head.reg_ffn.layers.1.\1'),
    (rf'bbox_embed\.layers\.2\.{_W}', r'bbox_head.fc_reg.\1'),
]

# Options of the original code that mmdet's DETR does not have.
_UNSUPPORTED = [
    (rf'transformer\.encoder\.norm\.{_W}', 'pre-norm transformer (args.pre_norm=True)'),
    (r'backbone\.1\.(row|col)_embed\.weight',
     "learned position embedding (args.position_embedding='learned')"),
]
# The panoptic model wraps the detector as ``detr`` and adds a mask head.
_SEGMENTATION = (r'detr\..*', r'bbox_attention\..*', r'mask_head\..*')
_REQUIRED = (r'transformer\.decoder\.layers\.0\.multihead_attn\.in_proj_weight',
             r'class_embed\.weight', r'query_embed\.weight')


def _detector_weights(state_dict, notes: List[str]):
    """The detector's weights of a detection or a panoptic (``detr.``-prefixed) checkpoint."""
    if not any(k.startswith('detr.') for k in state_dict):
        return dict(state_dict)
    dropped = [k for k in state_dict if not k.startswith('detr.')]
    if dropped:
        notes.append(f'dropped the panoptic mask head ({len(dropped)} keys: '
                     f'{", ".join(sorted({k.split(".")[0] for k in dropped}))}): '
                     "mmdet's DETR is the detector only")
    return {k[len('detr.'):]: v for k, v in state_dict.items() if k.startswith('detr.')}


def _dc5_evidence(source: Source):
    """True/False when the checkpoint says whether C5 is dilated, None when it cannot tell."""
    args = training_args(source)
    if 'dilation' in args:
        return bool(args['dilation']), 'args.dilation'
    if re.search(r'dc5', osp.basename(source.path), re.IGNORECASE):
        return True, "'dc5' in the file name"
    return None, None


def convert_official_detr(source: Source, dilation=None) -> Converted:
    """``dilation``: True/False forces DC5 or not; None reads it from the args / file name."""
    notes: List[str] = []
    args = training_args(source)
    weights = _detector_weights(source.state_dict, notes)
    refuse_keys(weights, _UNSUPPORTED)
    state_dict, unmatched = apply_key_rules(weights, DETR_RULES)
    if unmatched:
        raise ConversionError(f'{len(unmatched)} keys of {source.path} have no rule in '
                              f'detr-official: {", ".join(unmatched[:8])}')
    if dilation is None:
        dilation, why = _dc5_evidence(source)
        if dilation is None:
            dilation = False
            notes.append('no args.dilation and no "dc5" in the file name: C5 not dilated '
                         '(R50/R101). For a DC5 checkpoint use --from detr-official-dc5')
        else:
            notes.append(f'C5 {"dilated (DC5)" if dilation else "not dilated"}: from {why}')
    add_batch_counters(state_dict, notes)

    d = state_dict['query_embedding.weight'].shape[1]
    proj = state_dict['neck.convs.0.conv.weight']
    backbone, depth = resnet_spec(state_dict, [proj.shape[1]], dilation)
    heads = int(arg_or_default(args, 'nheads', 8, notes, 'the number of attention heads'))
    if d % heads:
        raise ConversionError(f'hidden dim {d} is not divisible by {heads} heads')
    dropout = float(args.get('dropout', 0.1))
    num_classes = state_dict['bbox_head.fc_cls.weight'].shape[0] - 1  # + no-object
    classes = class_names(num_classes, notes)

    def ffn(prefix):
        return dict(embed_dims=d, feedforward_channels=state_dict[
            f'{prefix}.layers.0.ffn.layers.0.0.weight'].shape[0], ffn_drop=dropout)

    attn = dict(embed_dims=d, num_heads=heads, dropout=dropout, batch_first=True)
    model = dict(
        type='DETRX',
        num_queries=state_dict['query_embedding.weight'].shape[0],
        backbone=backbone,
        neck=dict(in_channels=[int(proj.shape[1])], out_channels=d),
        encoder=dict(num_layers=count_indices(state_dict, r'encoder\.layers\.'),
                     layer_cfg=dict(self_attn_cfg=attn, ffn_cfg=ffn('encoder'))),
        decoder=dict(num_layers=count_indices(state_dict, r'decoder\.layers\.'),
                     layer_cfg=dict(self_attn_cfg=attn, cross_attn_cfg=attn,
                                    ffn_cfg=ffn('decoder'))),
        positional_encoding=dict(num_feats=d // 2),
        bbox_head=dict(type='DETRHead', embed_dims=d))
    notes.append(f'ResNet-{depth}{"-DC5" if dilation else ""}, {heads} heads, '
                 f'{model["num_queries"]} queries, {num_classes} classes')
    return Converted(state_dict=state_dict, base_config='mmdet::detr/detr_r50_8xb2-150e_coco.py',
                     model=model, classes=classes, notes=notes)


def _detr_match(source: Source) -> LayoutMatch:
    weights = {k[len('detr.'):] if k.startswith('detr.') else k: v
               for k, v in source.state_dict.items()}
    patterns = [p for p, _ in DETR_RULES] + [p for p, _ in _UNSUPPORTED]
    match = match_key_patterns([k for k in weights if not re.fullmatch(
        '|'.join(_SEGMENTATION[1:]), k)], patterns, _REQUIRED)
    return match


@register_layout
class OfficialDetrLayout(Layout):
    name = 'detr-official'
    description = ('facebookresearch/detr .pth (DETR R50/R101; DC5 from args.dilation or the '
                   'file name)')

    def match(self, source: Source) -> LayoutMatch:
        return _detr_match(source)

    def convert(self, source: Source) -> Converted:
        return convert_official_detr(source)


@register_layout
class OfficialDetrDC5Layout(Layout):
    """Named only (``--from detr-official-dc5``): the same weights with C5 dilated."""
    name = 'detr-official-dc5'
    description = 'facebookresearch/detr .pth, C5 dilated (DETR-DC5) whatever the file says'

    def match(self, source: Source) -> LayoutMatch:
        match = _detr_match(source)
        if match.full:  # detection picks detr-official, which reads DC5 from the checkpoint
            return LayoutMatch(score=0.999, reason='named only: detr-official detects DC5')
        return match

    def match_when_named(self, source: Source) -> LayoutMatch:
        return _detr_match(source)

    def convert(self, source: Source) -> Converted:
        return convert_official_detr(source, dilation=True)
