"""IDEA-Research/detrex checkpoints (DINO and Deformable DETR projects, ResNet backbones)
-> ``DINOX`` / ``DeformableDETRX``.

detrex builds its models from detectron2's ResNet and mmcv-style transformer layers
(``BaseTransformerLayer``: ``attentions.K``, ``ffns.0``, ``norms.K`` in operation order). The
module trees side by side (detrex left, mmdet right)::

    backbone.stem.conv1 (+ .norm)                       backbone.conv1 / bn1
    backbone.resS.B.convK (+ .norm), .shortcut (+ .norm) backbone.layer{S-1}.B.convK / bnK,
                                                        downsample.{0,1}
    neck.convs.L.{conv,norm}, neck.extra_convs.L.{conv,norm}   neck.convs.L.{conv,gn}, ... (bias)
    transformer.level_embeds                            level_embed
    transformer.encoder.layers.N.attentions.0.*         encoder.layers.N.self_attn.* (MSDA)
    transformer.{encoder,decoder}.layers.N.ffns.0.layers.{0.0,1}   *.ffn.layers.{0.0,1}
    transformer.{encoder,decoder}.layers.N.norms.K      *.norms.K       (same operation order)
    transformer.decoder.layers.N.attentions.0.attn.*    decoder.layers.N.self_attn.attn.*
    transformer.decoder.layers.N.attentions.1.*         decoder.layers.N.cross_attn.*
    class_embed.N / bbox_embed.N.layers.{0,1,2}         bbox_head.cls_branches.N /
                                                        reg_branches.N.{0,2,4}
    transformer.decoder.{class,bbox}_embed.N            (the same modules again: checked, dropped)
  DINO:
    transformer.tgt_embed                               query_embedding
    transformer.enc_output / enc_output_norm            memory_trans_fc / memory_trans_norm
    transformer.decoder.ref_point_head / norm           decoder.ref_point_head / decoder.norm
    label_enc                                           dn_query_generator.label_embedding
  Deformable DETR:
    query_embedding / transformer.reference_points      query_embedding / reference_points_fc
    transformer.enc_output / enc_output_norm (or its misspelling enc_outpout_norm)
    / pos_trans / pos_trans_norm                        memory_trans_fc / memory_trans_norm /
                                                        pos_trans_fc / pos_trans_norm

detrex's configs use a sine positional encoding with offset -0.5 and temperature 10000 for both
models (mmdet's DINO config: no offset, 20): the written config says so. detrex trains on the 80
contiguous COCO classes (its converters from the original repositories select them). Not read
from the weights, taken from detrex's R50 configs: 8 heads, ``stride_in_1x1=False``
(torchvision-style ResNet, the detrex default for torchvision weights), no dilation; Deformable
two-stage proposals = 300. detrex evaluates without padding masks, mmdet masks the padding of
each image: the outputs agree for a single image (no padding) and differ for padded batches.
No reference implementation runs here: these maps are checked by a strict load, shape checks
and key sets written from detrex's module definitions (docs/converters.md).
"""
import re
from typing import List

from ._original_common import (add_batch_counters, class_names, count_indices,
                               detectron2_resnet_rules, drop_aliases, equal_heads,
                               heads_and_points, resnet_spec)
from ._registry import (ConversionError, Converted, KeyPatternLayout, Source, apply_key_rules,
                        register_layout)
from .deformable_detr_official import deformable_model_cfg, head_rules
from .dino_official import dino_model_cfg

__all__ = ['DetrexDinoLayout', 'DetrexDeformableDetrLayout', 'convert_detrex']

_W = r'(weight|bias)'
_MSDA = r'(sampling_offsets|attention_weights|value_proj|output_proj)'
_MHA = r'(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)'
_HEADS = 8  # detrex's R50 configs
_TWO_STAGE_PROPOSALS = 300  # detrex's deformable_detr_r50_two_stage config


def _neck_rules() -> list:
    """detrex's ChannelMapper (``convs.L``, then ``extra_convs.L``; ``conv``/``norm``)."""
    return [
        (rf'neck\.convs\.(\d+)\.conv\.{_W}', r'neck.convs.\1.conv.\2'),
        (rf'neck\.convs\.(\d+)\.norm\.{_W}', r'neck.convs.\1.gn.\2'),
        (rf'neck\.extra_convs\.(\d+)\.conv\.{_W}', r'neck.extra_convs.\1.conv.\2'),
        (rf'neck\.extra_convs\.(\d+)\.norm\.{_W}', r'neck.extra_convs.\1.gn.\2'),
    ]


def _transformer_rules() -> list:
    enc, dec = r'transformer\.encoder\.layers\.(\d+)', r'transformer\.decoder\.layers\.(\d+)'
    return [
        (r'transformer\.level_embeds', 'level_embed'),
        (enc + rf'\.attentions\.0\.{_MSDA}\.{_W}', r'encoder.layers.\1.self_attn.\2.\3'),
        (dec + rf'\.attentions\.0\.attn\.{_MHA}', r'decoder.layers.\1.self_attn.attn.\2'),
        (dec + rf'\.attentions\.1\.{_MSDA}\.{_W}', r'decoder.layers.\1.cross_attn.\2.\3'),
        (r'transformer\.(encoder|decoder)\.layers\.(\d+)\.ffns\.0\.layers\.(0\.0|1)\.' + _W,
         r'\1.layers.\2.ffn.layers.\3.\4'),
        (r'transformer\.(encoder|decoder)\.layers\.(\d+)\.norms\.([012])\.' + _W,
         r'\1.layers.\2.norms.\3.\4'),
        (rf'transformer\.enc_output\.{_W}', r'memory_trans_fc.\1'),
        (rf'transformer\.enc_outp?o?ut_norm\.{_W}', r'memory_trans_norm.\1'),
    ]


def _dino_rules() -> list:
    return [
        *detectron2_resnet_rules('backbone.'), *_neck_rules(), *_transformer_rules(),
        (r'transformer\.tgt_embed\.weight', 'query_embedding.weight'),
        (rf'transformer\.decoder\.ref_point_head\.layers\.([01])\.{_W}',
         r'decoder.ref_point_head.layers.\1.\2'),
        (rf'transformer\.decoder\.norm\.{_W}', r'decoder.norm.\1'),
        (r'label_enc\.weight', 'dn_query_generator.label_embedding.weight'),
        *head_rules(),
    ]


def _deformable_rules() -> list:
    return [
        *detectron2_resnet_rules('backbone.'), *_neck_rules(), *_transformer_rules(),
        (r'query_embedding\.weight', 'query_embedding.weight'),
        (rf'transformer\.reference_points\.{_W}', r'reference_points_fc.\1'),
        (rf'transformer\.pos_trans\.{_W}', r'pos_trans_fc.\1'),
        (rf'transformer\.pos_trans_norm\.{_W}', r'pos_trans_norm.\1'),
        *head_rules(),
    ]


_ALIASES = (r'transformer\.decoder\.bbox_embed\..*', r'transformer\.decoder\.class_embed\..*')


def _neck_channels(weights) -> List[int]:
    outs = count_indices(weights, r'neck\.convs\.')
    return [int(weights[f'neck.convs.{i}.conv.weight'].shape[1]) for i in range(outs)]


def convert_detrex(source: Source, dino: bool) -> Converted:
    name = 'detrex-dino' if dino else 'detrex-deformable-detr'
    notes: List[str] = [f'not in the weights, from detrex\'s R50 configs: {_HEADS} heads, '
                        'stride_in_1x1=False, no dilation, sine positional encoding offset -0.5 '
                        'temperature 10000']
    weights = dict(source.state_dict)
    refine = dino or any(re.fullmatch(_ALIASES[0], k) for k in weights)
    drop_aliases(weights, 'transformer.decoder.bbox_embed.', 'bbox_embed.', notes)
    drop_aliases(weights, 'transformer.decoder.class_embed.', 'class_embed.', notes)
    in_channels = _neck_channels(weights)
    state_dict, unmatched = apply_key_rules(weights, _dino_rules() if dino
                                            else _deformable_rules())
    if unmatched:
        raise ConversionError(f'{len(unmatched)} keys of {source.path} have no rule in {name}: '
                              f'{", ".join(unmatched[:8])}')
    add_batch_counters(state_dict, notes)
    levels, d = state_dict['level_embed'].shape
    extra = count_indices(state_dict, r'neck\.extra_convs\.')
    if levels != len(in_channels) + extra:
        raise ConversionError(f'{levels} level embeddings but {len(in_channels) + extra} neck '
                              'outputs')
    two_stage = dino or 'memory_trans_fc.weight' in state_dict
    dec_layers = count_indices(state_dict, r'decoder\.layers\.')
    num_pred = dec_layers + 1 if two_stage else dec_layers
    stored = count_indices(state_dict, r'bbox_head\.cls_branches\.')
    if stored != num_pred:
        raise ConversionError(f'{stored} class heads, expected {num_pred} ({dec_layers} decoder '
                              f'layers{" + the encoder proposal head" if two_stage else ""})')
    if not refine and not (equal_heads(state_dict, 'bbox_head.cls_branches', num_pred)
                           and equal_heads(state_dict, 'bbox_head.reg_branches', num_pred)):
        refine = True
        notes.append('heads differ per decoder layer: box refinement')
    enc_points = heads_and_points(state_dict,
                                  'encoder.layers.0.self_attn.attention_weights.weight', levels,
                                  _HEADS, None, 'encoder')
    dec_points = heads_and_points(state_dict,
                                  'decoder.layers.0.cross_attn.attention_weights.weight', levels,
                                  _HEADS, None, 'decoder')
    backbone, depth = resnet_spec(state_dict, in_channels, dilation=False)
    num_classes = state_dict['bbox_head.cls_branches.0.weight'].shape[0]
    classes = class_names(num_classes, notes)
    common = dict(levels=levels, heads=_HEADS, enc_points=enc_points, dec_points=dec_points,
                  backbone=backbone, in_channels=in_channels, dropout=0.0)
    if dino:
        if d != 256:
            raise ConversionError(f"unsupported hidden dim {d}: mmdet 3.3's DINO decoder "
                                  'encodes reference points with 128 features per coordinate')
        label = state_dict['dn_query_generator.label_embedding.weight']
        if label.shape[0] != num_classes:
            raise ConversionError(f'label_enc has {label.shape[0]} rows for {num_classes} '
                                  'classes (detrex sizes it num_classes)')
        num_queries = state_dict['query_embedding.weight'].shape[0]
        model = dino_model_cfg(state_dict, temperature=10000.0, offset=-0.5,
                               num_queries=num_queries, **common)
        base = 'dino/dinox-4scale_r50_8xb2-12e_coco.py'
    else:
        if two_stage:
            if d != 256:
                raise ConversionError(f'unsupported hidden dim {d} with two-stage (256 only)')
            norm = state_dict.get('pos_trans_norm.weight')
            if norm is not None and norm.shape[0] != 2 * d:
                raise ConversionError(
                    f'transformer.pos_trans_norm has {norm.shape[0]} features for a {2 * d}-wide '
                    "pos_trans: written by a detrex version whose two-stage LayerNorm did not fit "
                    "its input (that model cannot run); no mmdet counterpart")
            num_queries = _TWO_STAGE_PROPOSALS
            notes.append(f'two-stage proposals: {num_queries} (detrex\'s config; not stored)')
        else:
            num_queries = state_dict['query_embedding.weight'].shape[0]
        model = deformable_model_cfg(state_dict, num_queries=num_queries, refine=refine,
                                     two_stage=two_stage, **common)
        model['positional_encoding'].update(temperature=10000.0, offset=-0.5)
        base = ('deformable_detr/deformable-detrx-refine-twostage_r50_16xb2-50e_coco.py'
                if two_stage else 'deformable_detr/deformable-detrx_r50_16xb2-50e_coco.py')
        notes.append(f'box refinement: {"yes" if refine else "no"}; two-stage: '
                     f'{"yes" if two_stage else "no"}')
    notes.append(f'ResNet-{depth}, {levels} levels, {enc_points}/{dec_points} encoder/decoder '
                 f'points, {num_queries} queries, {num_classes} classes')
    return Converted(state_dict=state_dict, base_config=base, model=model, classes=classes,
                     notes=notes)


@register_layout
class DetrexDinoLayout(KeyPatternLayout):
    name = 'detrex-dino'
    description = 'IDEA-Research/detrex DINO checkpoint (projects/dino, ResNet backbone)'
    key_patterns = [p for p, _ in _dino_rules()] + list(_ALIASES)
    required_keys = (r'transformer\.level_embeds', r'transformer\.tgt_embed\.weight',
                     r'label_enc\.weight', r'backbone\.stem\.conv1\.weight')

    def convert(self, source: Source) -> Converted:
        return convert_detrex(source, dino=True)


@register_layout
class DetrexDeformableDetrLayout(KeyPatternLayout):
    name = 'detrex-deformable-detr'
    description = ('IDEA-Research/detrex Deformable DETR checkpoint (projects/deformable_detr: '
                   'single-stage, box refinement, two-stage; ResNet backbone)')
    key_patterns = [p for p, _ in _deformable_rules()] + list(_ALIASES)
    required_keys = (r'transformer\.level_embeds', r'class_embed\.0\.weight',
                     r'backbone\.stem\.conv1\.weight')

    def convert(self, source: Source) -> Converted:
        return convert_detrex(source, dino=False)
