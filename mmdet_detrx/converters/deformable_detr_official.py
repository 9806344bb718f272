"""fundamentalvision/Deformable-DETR ``.pth`` (plain, +iterative box refinement, +two-stage)
-> ``DeformableDETRX`` (``configs/deformable_detr/deformable-detrx_r50_16xb2-50e_coco.py``).

The two module trees side by side (the original's ``models/deformable_detr.py`` +
``deformable_transformer.py`` left, mmdet's Deformable DETR right)::

    backbone.0.body.*   (torchvision ResNet, C3-C5)    backbone.*        (same names)
    input_proj.L.{0,1}  (1x1 conv + GN, backbone maps)  neck.convs.L.{conv,gn}        (conv bias:
    input_proj.L.{0,1}  (3x3/2 conv + GN, extra levels) neck.extra_convs.L'.{conv,gn}  bias=True)
    query_embed         (Q x 2d: position | content)    query_embedding          (single-stage)
    transformer.level_embed                             level_embed
    transformer.reference_points                        reference_points_fc      (single-stage)
    transformer.enc_output / enc_output_norm            memory_trans_fc / memory_trans_norm
    transformer.pos_trans / pos_trans_norm              pos_trans_fc / pos_trans_norm (2-stage)
    transformer.encoder.layers.N.
        self_attn.{sampling_offsets,attention_weights,value_proj,output_proj}
                                                        encoder.layers.N.self_attn.* (same)
        norm1 / linear1 / linear2 / norm2               norms.0 / ffn.layers.0.0 /
                                                        ffn.layers.1 / norms.1
    transformer.decoder.layers.N.
        self_attn.{in_proj_*,out_proj} / norm2          decoder.layers.N.self_attn.attn.* / norms.0
        cross_attn.*                   / norm1          cross_attn.*                      / norms.1
        linear1 / linear2 / norm3                       ffn.layers.0.0 / ffn.layers.1 / norms.2
    class_embed.N                                       bbox_head.cls_branches.N
    bbox_embed.N.layers.{0,1,2}                         bbox_head.reg_branches.N.{0,2,4}
    transformer.decoder.{bbox,class}_embed.N            (the same modules again: checked, dropped)

The decoder layer runs self-attention, cross-attention, FFN in both, but the original numbers its
norms in another order (``norm2`` follows self-attention). Without box refinement the heads are
one module stored once per decoder layer in both code bases; with two-stage the last class/box
branch scores the encoder's tokens (by class column 0) in both. Both use a sine positional
encoding with offset -0.5 and a 128-per-coordinate proposal embedding.

Read from the shapes: hidden dim, queries (single-stage), feature levels, encoder/decoder layers,
FFN widths, classes, box refinement (separate heads), two-stage (``enc_output``), the backbone's
depth and which stages feed the projections. From ``args`` when the checkpoint has them (else the
repository default, noted): heads (8), two-stage proposals (300), dilation (no).
"""
import re
from typing import Dict, List

import torch

from ._original_common import (add_batch_counters, arg_or_default, class_names, count_indices,
                               drop_aliases, equal_heads, heads_and_points, input_proj_rules,
                               projection_channels, refuse_keys, resnet_spec,
                               torchvision_resnet_rules, training_args)
from ._registry import (ConversionError, Converted, KeyPatternLayout, Source, apply_key_rules,
                        register_layout)

__all__ = ['deformable_transformer_rules', 'OfficialDeformableDetrLayout',
           'convert_official_deformable_detr', 'deformable_model_cfg']

_W = r'(weight|bias)'
_MSDA = r'(sampling_offsets|attention_weights|value_proj|output_proj)'
_MHA = r'(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)'


def deformable_transformer_rules(prefix: str = r'transformer\.') -> list:
    """The original DeformableTransformer's layers (shared by DINO's) -> mmdet's."""
    enc, dec = prefix + r'encoder\.layers\.(\d+)', prefix + r'decoder\.layers\.(\d+)'
    return [
        (enc + rf'\.self_attn\.{_MSDA}\.{_W}', r'encoder.layers.\1.self_attn.\2.\3'),
        (enc + rf'\.norm1\.{_W}', r'encoder.layers.\1.norms.0.\2'),
        (enc + rf'\.linear1\.{_W}', r'encoder.layers.\1.ffn.layers.0.0.\2'),
        (enc + rf'\.linear2\.{_W}', r'encoder.layers.\1.ffn.layers.1.\2'),
        (enc + rf'\.norm2\.{_W}', r'encoder.layers.\1.norms.1.\2'),
        (dec + rf'\.self_attn\.{_MHA}', r'decoder.layers.\1.self_attn.attn.\2'),
        (dec + rf'\.norm2\.{_W}', r'decoder.layers.\1.norms.0.\2'),
        (dec + rf'\.cross_attn\.{_MSDA}\.{_W}', r'decoder.layers.\1.cross_attn.\2.\3'),
        (dec + rf'\.norm1\.{_W}', r'decoder.layers.\1.norms.1.\2'),
        (dec + rf'\.linear1\.{_W}', r'decoder.layers.\1.ffn.layers.0.0.\2'),
        (dec + rf'\.linear2\.{_W}', r'decoder.layers.\1.ffn.layers.1.\2'),
        (dec + rf'\.norm3\.{_W}', r'decoder.layers.\1.norms.2.\2'),
        (prefix + r'level_embed', 'level_embed'),
    ]


def head_rules(class_prefix: str = 'class_embed', bbox_prefix: str = 'bbox_embed') -> list:
    """``class_embed.N`` / ``bbox_embed.N.layers.{0,1,2}`` -> mmdet's head branches (its
    ``reg_branches`` interleave ReLUs: Linear modules at 0, 2, 4)."""
    return [
        (rf'{class_prefix}\.(\d+)\.{_W}', r'bbox_head.cls_branches.\1.\2'),
        (rf'{bbox_prefix}\.(\d+)\.layers\.([012])\.{_W}',
         lambda m: f'bbox_head.reg_branches.{m[1]}.{2 * int(m[2])}.{m[3]}'),
    ]


def _rules(num_backbone_outs: int) -> list:
    return [
        *torchvision_resnet_rules('backbone.0.body.'),
        *input_proj_rules('input_proj.', num_backbone_outs),
        (r'query_embed\.weight', 'query_embedding.weight'),
        (rf'transformer\.reference_points\.{_W}', r'reference_points_fc.\1'),
        (rf'transformer\.enc_output\.{_W}', r'memory_trans_fc.\1'),
        (rf'transformer\.enc_output_norm\.{_W}', r'memory_trans_norm.\1'),
        (rf'transformer\.pos_trans\.{_W}', r'pos_trans_fc.\1'),
        (rf'transformer\.pos_trans_norm\.{_W}', r'pos_trans_norm.\1'),
        *deformable_transformer_rules(),
        *head_rules(),
    ]


_ALIASES = ((r'transformer\.decoder\.bbox_embed\..*'), (r'transformer\.decoder\.class_embed\..*'))
_REQUIRED = (r'transformer\.level_embed',
             r'transformer\.encoder\.layers\.0\.self_attn\.sampling_offsets\.weight',
             r'class_embed\.0\.weight')


def deformable_model_cfg(state_dict: Dict[str, torch.Tensor], *, levels: int, heads: int,
                         enc_points: int, dec_points: int, backbone: dict,
                         in_channels: List[int], dropout: float, num_queries: int,
                         refine: bool, two_stage: bool) -> dict:
    """The ``model`` overrides of a Deformable DETR (mmdet names, renamed weights)."""
    d = state_dict['level_embed'].shape[1]

    def ffn(coder):
        width = state_dict[f'{coder}.layers.0.ffn.layers.0.0.weight'].shape[0]
        return dict(embed_dims=d, feedforward_channels=width, ffn_drop=dropout)

    return dict(
        type='DeformableDETRX',
        num_queries=num_queries,
        num_feature_levels=levels,
        with_box_refine=refine,
        as_two_stage=two_stage,
        backbone=backbone,
        neck=dict(in_channels=in_channels, out_channels=d, num_outs=levels, bias=True),
        encoder=dict(num_layers=count_indices(state_dict, r'encoder\.layers\.'), layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=d, num_heads=heads, num_levels=levels,
                               num_points=enc_points, dropout=dropout),
            ffn_cfg=ffn('encoder'))),
        decoder=dict(num_layers=count_indices(state_dict, r'decoder\.layers\.'), layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=d, num_heads=heads, dropout=dropout,
                               batch_first=True),
            cross_attn_cfg=dict(embed_dims=d, num_heads=heads, num_levels=levels,
                                num_points=dec_points, dropout=dropout),
            ffn_cfg=ffn('decoder'))),
        positional_encoding=dict(num_feats=d // 2),
        bbox_head=dict(embed_dims=d))


def convert_official_deformable_detr(source: Source) -> Converted:
    notes: List[str] = []
    args = training_args(source)
    weights = dict(source.state_dict)
    refuse_keys(weights, [(r'backbone\.1\.(row|col)_embed\.weight',
                           "learned position embedding (args.position_embedding='learned')")])
    refine = any(re.fullmatch(_ALIASES[0], k) for k in weights)
    two_stage = 'transformer.enc_output.weight' in weights
    drop_aliases(weights, 'transformer.decoder.bbox_embed.', 'bbox_embed.', notes)
    drop_aliases(weights, 'transformer.decoder.class_embed.', 'class_embed.', notes)
    in_channels, extra = projection_channels(weights, 'input_proj.', '0')
    state_dict, unmatched = apply_key_rules(weights, _rules(len(in_channels)))
    if unmatched:
        raise ConversionError(f'{len(unmatched)} keys of {source.path} have no rule in '
                              f'deformable-detr-official: {", ".join(unmatched[:8])}')
    add_batch_counters(state_dict, notes)

    levels = state_dict['level_embed'].shape[0]
    if levels != len(in_channels) + extra:
        raise ConversionError(f'{levels} level embeddings but {len(in_channels) + extra} input '
                              'projections')
    dec_layers = count_indices(state_dict, r'decoder\.layers\.')
    num_pred = dec_layers + 1 if two_stage else dec_layers
    stored = count_indices(state_dict, r'bbox_head\.cls_branches\.')
    if stored != num_pred:
        raise ConversionError(f'{stored} class heads, expected {num_pred} ({dec_layers} decoder '
                              f'layers{" + the two-stage proposal head" if two_stage else ""})')
    if not refine and not (equal_heads(state_dict, 'bbox_head.cls_branches', num_pred)
                           and equal_heads(state_dict, 'bbox_head.reg_branches', num_pred)):
        refine = True  # separate heads whose decoder copies were stripped from the file
        notes.append('heads differ per decoder layer: box refinement (the decoder copies '
                     'transformer.decoder.bbox_embed are not in the file)')
    notes.append(f'box refinement: {"yes" if refine else "no"}; two-stage: '
                 f'{"yes" if two_stage else "no"} (transformer.enc_output '
                 f'{"present" if two_stage else "absent"})')

    heads = int(arg_or_default(args, 'nheads', 8, notes, 'the number of attention heads'))
    enc_points = heads_and_points(
        state_dict, 'encoder.layers.0.self_attn.attention_weights.weight', levels, heads,
        args.get('enc_n_points'), 'encoder')
    dec_points = heads_and_points(
        state_dict, 'decoder.layers.0.cross_attn.attention_weights.weight', levels, heads,
        args.get('dec_n_points'), 'decoder')
    dilation = bool(args.get('dilation', False))
    backbone, depth = resnet_spec(state_dict, in_channels, dilation)
    if two_stage:
        num_queries = int(arg_or_default(args, 'num_queries', 300, notes,
                                         'the number of two-stage proposals'))
    else:
        num_queries = state_dict['query_embedding.weight'].shape[0]
    d = state_dict['level_embed'].shape[1]
    if two_stage and d != 256:
        raise ConversionError(f"unsupported hidden dim {d} with two-stage: mmdet's Deformable "
                              'DETR hard-codes a 128-per-coordinate proposal embedding (256)')
    num_classes = state_dict['bbox_head.cls_branches.0.weight'].shape[0]
    classes = class_names(num_classes, notes)
    model = deformable_model_cfg(
        state_dict, levels=levels, heads=heads, enc_points=enc_points, dec_points=dec_points,
        backbone=backbone, in_channels=in_channels, dropout=float(args.get('dropout', 0.1)),
        num_queries=num_queries, refine=refine, two_stage=two_stage)
    notes.append(f'ResNet-{depth}{"-DC5" if dilation else ""}, {levels} levels, {heads} heads, '
                 f'{enc_points}/{dec_points} encoder/decoder points, {num_queries} queries, '
                 f'{num_classes} classes')
    base = ('deformable_detr/deformable-detrx-refine-twostage_r50_16xb2-50e_coco.py'
            if two_stage else 'deformable_detr/deformable-detrx_r50_16xb2-50e_coco.py')
    return Converted(state_dict=state_dict, base_config=base, model=model, classes=classes,
                     notes=notes)


@register_layout
class OfficialDeformableDetrLayout(KeyPatternLayout):
    name = 'deformable-detr-official'
    description = ('fundamentalvision/Deformable-DETR .pth (single-stage, box refinement, '
                   'two-stage)')
    key_patterns = [p for p, _ in _rules(1)] + list(_ALIASES) + [
        r'backbone\.1\.(row|col)_embed\.weight']
    required_keys = _REQUIRED

    def convert(self, source: Source) -> Converted:
        return convert_official_deformable_detr(source)
