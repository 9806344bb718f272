"""HF transformers ``DeformableDetrForObjectDetection`` -> ``DeformableDETRX`` (hub:
SenseTime/deformable-detr, -with-box-refine, -with-box-refine-two-stage).

The two module trees side by side (transformers 5 names, ``model.`` dropped, left; ours, right;
``E``/``D`` = ``encoder.layers.N`` / ``decoder.layers.N``)::

    backbone.model.*                      backbone.*            (timm / HF ResNet)
    input_proj.L.{0,1} (backbone levels)  neck.convs.L.{conv,gn}       (conv bias kept:
    input_proj.L.{0,1} (extra levels)     neck.extra_convs.L'.{conv,gn}  neck bias=True)
    level_embed                           level_embed
    query_position_embeddings             query_embedding        (single-stage)
    reference_points                      reference_points_fc    (single-stage)
    enc_output / enc_output_norm          memory_trans_fc / memory_trans_norm  (two-stage)
    pos_trans / pos_trans_norm            pos_trans_fc / pos_trans_norm        (two-stage)
    E.self_attn.*, D.encoder_attn.*       E.self_attn.*, D.cross_attn.*  (MSDA: same names)
    E.{self_attn,final}_layer_norm        E.norms.{0,1}
    E/D.mlp.fc1 / fc2                     E/D.ffn.layers.0.0 / ffn.layers.1
    D.self_attn.{q,k,v}_proj / o_proj     D.self_attn.attn.in_proj_* (packed) / attn.out_proj
    D.{self_attn,encoder_attn,final}_layer_norm   D.norms.{0,1,2}
    class_embed.N (top level)             bbox_head.cls_branches.N
    bbox_embed.N.layers.{0,1,2}           bbox_head.reg_branches.N.{0,2,4}
    decoder.{class,bbox}_embed.N          (the head's modules again: kept once, checked equal)

Both sides use sigmoid class logits (``num_labels`` / ``num_classes``) and predict boxes as
``sigmoid(delta + inverse_sigmoid(reference))``; the two-stage proposal head is the last class
and box branch in both. Two-stage: mmdet's ``num_queries`` is HF's ``two_stage_num_proposals``.
"""
import re
from typing import List

import torch

from ._hf_common import (backbone_rules, backbone_spec, class_names, normalisation,
                         read_hf_model, require_option)
from ._original_common import add_batch_counters
from ._registry import ConversionError, Converted, Source, apply_key_rules, register_layout
from .hf_detr import _HFLayout, pack_qkv

__all__ = ['HFDeformableDetrLayout', 'deformable_rules']

_W = r'(weight|bias)'


def deformable_rules(num_backbone_outs: int) -> list:
    """HF (transformers 5 names) -> ours for the Deformable DETR transformer and head."""
    enc, dec = r'model\.encoder\.layers\.(\d+)', r'model\.decoder\.layers\.(\d+)'
    msda = r'(sampling_offsets|attention_weights|value_proj|output_proj)'

    def input_proj(m):
        level, part, param = int(m[1]), {'0': 'conv', '1': 'gn'}[m[2]], m[3]
        if level < num_backbone_outs:
            return f'neck.convs.{level}.{part}.{param}'
        return f'neck.extra_convs.{level - num_backbone_outs}.{part}.{param}'

    return [
        (rf'model\.input_proj\.(\d+)\.([01])\.{_W}', input_proj),
        (r'model\.level_embed', 'level_embed'),
        (r'model\.query_position_embeddings\.weight', 'query_embedding.weight'),
        (rf'model\.reference_points\.{_W}', r'reference_points_fc.\1'),
        (rf'model\.enc_output\.{_W}', r'memory_trans_fc.\1'),
        (rf'model\.enc_output_norm\.{_W}', r'memory_trans_norm.\1'),
        (rf'model\.pos_trans\.{_W}', r'pos_trans_fc.\1'),
        (rf'model\.pos_trans_norm\.{_W}', r'pos_trans_norm.\1'),
        (enc + rf'\.self_attn\.{msda}\.{_W}', r'encoder.layers.\1.self_attn.\2.\3'),
        (enc + rf'\.self_attn_layer_norm\.{_W}', r'encoder.layers.\1.norms.0.\2'),
        (enc + rf'\.final_layer_norm\.{_W}', r'encoder.layers.\1.norms.1.\2'),
        (enc + rf'\.mlp\.fc1\.{_W}', r'encoder.layers.\1.ffn.layers.0.0.\2'),
        (enc + rf'\.mlp\.fc2\.{_W}', r'encoder.layers.\1.ffn.layers.1.\2'),
        (dec + rf'\.self_attn\.([qkv])_proj\.{_W}',
         r'decoder.layers.\1.self_attn.attn.in_proj_\3#\2'),
        (dec + rf'\.self_attn\.o_proj\.{_W}', r'decoder.layers.\1.self_attn.attn.out_proj.\2'),
        (dec + rf'\.encoder_attn\.{msda}\.{_W}', r'decoder.layers.\1.cross_attn.\2.\3'),
        (dec + rf'\.self_attn_layer_norm\.{_W}', r'decoder.layers.\1.norms.0.\2'),
        (dec + rf'\.encoder_attn_layer_norm\.{_W}', r'decoder.layers.\1.norms.1.\2'),
        (dec + rf'\.final_layer_norm\.{_W}', r'decoder.layers.\1.norms.2.\2'),
        (dec + rf'\.mlp\.fc1\.{_W}', r'decoder.layers.\1.ffn.layers.0.0.\2'),
        (dec + rf'\.mlp\.fc2\.{_W}', r'decoder.layers.\1.ffn.layers.1.\2'),
        (rf'class_embed\.(\d+)\.{_W}', r'bbox_head.cls_branches.\1.\2'),
        (rf'bbox_embed\.(\d+)\.layers\.([012])\.{_W}',
         lambda m: f'bbox_head.reg_branches.{m[1]}.{2 * int(m[2])}.{m[3]}'),
    ]


def _merge_decoder_heads(weights) -> None:
    """The decoder's ``class_embed``/``bbox_embed`` are the head's modules (box refinement,
    two-stage); transformers' state_dict() lists both names, its saved files the decoder's
    only. Keep the head's names, checking equal copies."""
    for key in [k for k in weights if re.match(r'model\.decoder\.(class|bbox)_embed\.', k)]:
        head_key = key[len('model.decoder.'):]
        value = weights.pop(key)
        if head_key not in weights:
            weights[head_key] = value
        elif not torch.equal(value, weights[head_key]):
            raise ConversionError(f'{key} differs from {head_key}: the decoder and the head '
                                  'share these modules in Deformable DETR')


def _fill_heads(weights, num_pred: int, refine: bool, two_stage: bool, notes: List[str]) -> None:
    """Give every head index its weights. Heads HF ties to index 0 (all of them without box
    refinement; the class heads with box refinement but one stage) may be stored once."""
    for prefix, separate in (('class_embed', two_stage), ('bbox_embed', refine)):
        first = {k[len(prefix) + 3:]: v for k, v in weights.items()
                 if k.startswith(prefix + '.0.')}
        copied = []
        for index in range(1, num_pred):
            if any(k.startswith(f'{prefix}.{index}.') for k in weights):
                continue
            if separate:
                raise ConversionError(f'{prefix}.{index}.* missing: this variant has a separate '
                                      'head per decoder layer')
            for suffix, value in first.items():
                weights[f'{prefix}.{index}.{suffix}'] = value
            copied.append(index)
        if copied:
            notes.append(f'{prefix}.{copied} = {prefix}.0 (one head shared by the layers, as HF '
                         'ties it; stored once)')


def convert_hf_deformable_detr(source: Source) -> Converted:
    hf = read_hf_model(source, 'deformable_detr')
    config, weights = hf.config, dict(hf.state_dict)
    notes = [f'read with {hf.read_with}']
    require_option(config, 'position_embedding_type', ('sine', ), 'sine',
                   "position embedding (mmdet's Deformable DETR builds a sine embedding)")
    require_option(config, 'activation_function', ('relu', ), 'relu', 'activation')
    two_stage = bool(config.get('two_stage', 'model.enc_output.weight' in weights))
    refine = bool(config.get('with_box_refine',
                             any(k.startswith('model.decoder.bbox_embed.') for k in weights)))
    # transformers 5 ties heads of one stage with box refinement: mmdet's separate branches
    # then load equal copies
    levels = config.get('num_feature_levels', weights['model.level_embed'].shape[0])
    d = weights['model.level_embed'].shape[1]
    default_out = [2, 3, 4] if levels > 1 else [4]
    backbone, kind = backbone_spec(config, weights, default_out_indices=default_out)
    out_indices = tuple(backbone['out_indices'])
    num_backbone_outs = len({int(m[1]) for k in weights
                             for m in [re.match(r'model\.input_proj\.(\d+)\.0\.weight', k)] if m
                             if weights[k].shape[-1] == 1})
    if num_backbone_outs != len(out_indices):
        raise ConversionError(f'{num_backbone_outs} 1x1 input projections but the backbone '
                              f'config gives {len(out_indices)} outputs ({list(out_indices)})')
    _merge_decoder_heads(weights)

    def count(prefix):
        return len({int(m[1]) for k in weights for m in [re.match(prefix + r'(\d+)\.', k)] if m})

    enc_layers, dec_layers = count(r'model\.encoder\.layers\.'), count(r'model\.decoder\.layers\.')
    num_pred = dec_layers + 1 if two_stage else dec_layers
    _fill_heads(weights, num_pred, refine, two_stage, notes)
    state_dict, unmatched = apply_key_rules(weights, backbone_rules(kind) +
                                            deformable_rules(num_backbone_outs))
    if unmatched:
        raise ConversionError(f'{len(unmatched)} keys of {source.path} have no rule in '
                              f'hf-deformable-detr: {", ".join(unmatched[:8])}')
    state_dict = pack_qkv(state_dict)
    add_batch_counters(state_dict, notes)
    num_classes = state_dict['bbox_head.cls_branches.0.weight'].shape[0]
    classes = class_names(config, num_classes, notes)
    mean, std = normalisation(source, notes)

    heads = {}
    for key in ('encoder_attention_heads', 'decoder_attention_heads'):
        heads[key] = config.get(key)
        if heads[key] is None:
            heads[key] = 8
            notes.append(f'{key} not in the source (a bare state dict): 8 assumed, as HF')

    def points(layer_key, heads_key):
        columns = weights[layer_key].shape[0]  # heads * levels * points
        if columns % (heads[heads_key] * levels):
            raise ConversionError(f'{layer_key} has {columns} outputs, not a multiple of '
                                  f'{heads_key}={heads[heads_key]} x {levels} levels: give the '
                                  'HF folder (config.json) rather than a bare state dict')
        return columns // (heads[heads_key] * levels)

    enc_points = config.get('encoder_n_points') or points(
        'model.encoder.layers.0.self_attn.attention_weights.weight', 'encoder_attention_heads')
    dec_points = config.get('decoder_n_points') or points(
        'model.decoder.layers.0.encoder_attn.attention_weights.weight', 'decoder_attention_heads')
    if two_stage and d != 256:
        raise ConversionError(f"unsupported d_model={d} with two_stage: mmdet's Deformable DETR "
                              'hard-codes a 128-per-coordinate proposal embedding (d_model 256)')
    if two_stage:
        num_queries = config.get('two_stage_num_proposals', 300)
    else:
        num_queries = weights['model.query_position_embeddings.weight'].shape[0]
    dropout = config.get('dropout', 0.1)
    expansion = 4 if backbone['depth'] >= 50 else 1
    base_channels = backbone.get('base_channels', 64)
    in_channels = [base_channels * expansion * 2**i for i in out_indices]
    ffn = dict(embed_dims=d, feedforward_channels=config.get(
        'encoder_ffn_dim', weights['model.encoder.layers.0.mlp.fc1.weight'].shape[0]),
        ffn_drop=dropout)
    dec_ffn = dict(ffn, feedforward_channels=config.get(
        'decoder_ffn_dim', weights['model.decoder.layers.0.mlp.fc1.weight'].shape[0]))
    model = dict(
        type='DeformableDETRX',
        num_queries=num_queries,
        num_feature_levels=levels,
        with_box_refine=refine,
        as_two_stage=two_stage,
        backbone=backbone,
        neck=dict(in_channels=in_channels, out_channels=d, num_outs=levels, bias=True),
        encoder=dict(num_layers=enc_layers, layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=d, num_heads=heads['encoder_attention_heads'],
                               num_levels=levels, num_points=enc_points, dropout=dropout),
            ffn_cfg=ffn)),
        decoder=dict(num_layers=dec_layers, layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=d, num_heads=heads['decoder_attention_heads'],
                               dropout=config.get('attention_dropout', 0.0), batch_first=True),
            cross_attn_cfg=dict(embed_dims=d, num_heads=heads['decoder_attention_heads'],
                                num_levels=levels, num_points=dec_points, dropout=dropout),
            ffn_cfg=dec_ffn)),
        positional_encoding=dict(num_feats=d // 2),
        bbox_head=dict(embed_dims=d))
    base = ('deformable_detr/deformable-detrx-refine-twostage_r50_16xb2-50e_coco.py' if two_stage
            else 'deformable_detr/deformable-detrx_r50_16xb2-50e_coco.py')
    return Converted(state_dict=state_dict, base_config=base, model=model, classes=classes,
                     mean=mean, std=std, notes=notes)


@register_layout
class HFDeformableDetrLayout(_HFLayout):
    name = 'hf-deformable-detr'
    description = ('HF transformers DeformableDetrForObjectDetection (single-stage, box '
                   'refinement, two-stage)')
    model_type = 'deformable_detr'
    required = (r'model\.level_embed', r'(model\.decoder\.)?class_embed\.0\.weight')

    def key_patterns(self):
        return [p for p, _ in deformable_rules(1)] + [r'model\.backbone\.model\..*',
                                                      r'model\.decoder\.(class|bbox)_embed\..*']

    def convert(self, source: Source) -> Converted:
        return convert_hf_deformable_detr(source)
