"""IDEA-Research/DINO ``.pth`` (DINO-4scale / 5scale, ResNet backbones) -> ``DINOX``
(``configs/dino/dinox-4scale_r50_8xb2-12e_coco.py``).

The two module trees side by side (the original's ``models/dino/dino.py`` +
``deformable_transformer.py`` left, mmdet's DINO right)::

    backbone.0.body.*   (torchvision ResNet)            backbone.*          (same names)
    input_proj.L.{0,1}                                  neck.convs.L / neck.extra_convs.L'
                                                        .{conv,gn}          (conv bias kept)
    transformer.level_embed                             level_embed
    transformer.tgt_embed         (content queries)     query_embedding
    transformer.enc_output / enc_output_norm            memory_trans_fc / memory_trans_norm
    transformer.encoder.layers.N.*                      encoder.layers.N.* (as Deformable DETR)
    transformer.decoder.layers.N.*                      decoder.layers.N.* (as Deformable DETR)
    transformer.decoder.ref_point_head.layers.{0,1}     decoder.ref_point_head.layers.{0,1}
    transformer.decoder.norm                            decoder.norm
    class_embed.N / bbox_embed.N.layers.{0,1,2}         bbox_head.cls_branches.N /
                                                        bbox_head.reg_branches.N.{0,2,4}
    transformer.enc_out_class_embed / enc_out_bbox_embed   the last branch (index = decoder layers)
    label_enc  (dn_labelbook_size + 1 rows)             dn_query_generator.label_embedding
                                                        (num_classes rows; the rest is dropped)
    transformer.decoder.{class,bbox}_embed.N            (the same modules again: checked, dropped)

Both select the top ``num_queries`` encoder tokens by their best class score, take the content
queries from ``tgt_embed`` (``embed_init_tgt``), encode each reference box with 128 sine
features per coordinate (temperature 10000) for ``ref_point_head``, refine boxes layer by layer
and normalise every decoder output with ``decoder.norm``. The sine positional encoding of the
feature maps has no offset and temperature ``args.pe_temperatureH/W`` (20 when the args are
missing, the repository's configs).

Only the standard DINO is supported: options with weights mmdet's DINO does not have
(``two_stage_type='no'``, ``decoder_sa_type='ca_label'``, learned two-stage w/h, pattern
embeddings, per-layer encoder proposals, ...) are refused by the key that shows them.
No reference implementation runs here: this map is checked by a strict load, shape checks and a
key set written from the original module definitions (docs/converters.md).
"""
from typing import List

from ._original_common import (add_batch_counters, arg_or_default, class_names, count_indices,
                               drop_aliases, heads_and_points, input_proj_rules,
                               projection_channels, refuse_keys, resnet_spec,
                               torchvision_resnet_rules, training_args)
from ._registry import (ConversionError, Converted, KeyPatternLayout, Source, apply_key_rules,
                        register_layout)
from .deformable_detr_official import (deformable_model_cfg, deformable_transformer_rules,
                                       head_rules)

__all__ = ['OfficialDinoLayout', 'convert_official_dino', 'dino_model_cfg', 'dino_head_rules']

_W = r'(weight|bias)'


def dino_head_rules(num_decoder_layers: int) -> list:
    """DINO's decoder heads and its separate encoder (proposal) heads -> mmdet's branches."""
    last = num_decoder_layers
    return [
        *head_rules(),
        (rf'transformer\.enc_out_class_embed\.{_W}', rf'bbox_head.cls_branches.{last}.\1'),
        (rf'transformer\.enc_out_bbox_embed\.layers\.([012])\.{_W}',
         lambda m: f'bbox_head.reg_branches.{last}.{2 * int(m[1])}.{m[2]}'),
    ]


def _rules(num_backbone_outs: int, num_decoder_layers: int) -> list:
    return [
        *torchvision_resnet_rules('backbone.0.body.'),
        *input_proj_rules('input_proj.', num_backbone_outs),
        (r'transformer\.tgt_embed\.weight', 'query_embedding.weight'),
        (rf'transformer\.enc_output\.{_W}', r'memory_trans_fc.\1'),
        (rf'transformer\.enc_output_norm\.{_W}', r'memory_trans_norm.\1'),
        *deformable_transformer_rules(),
        (rf'transformer\.decoder\.ref_point_head\.layers\.([01])\.{_W}',
         r'decoder.ref_point_head.layers.\1.\2'),
        (rf'transformer\.decoder\.norm\.{_W}', r'decoder.norm.\1'),
        *dino_head_rules(num_decoder_layers),
        (r'label_enc\.weight', 'dn_query_generator.label_embedding.weight'),
    ]


# Weights of DINO options that mmdet's DINO does not implement.
_UNSUPPORTED = [
    (r'(transformer\.)?refpoint_embed\.weight', "two_stage_type='no' or two_stage_add_query_num"),
    (r'label_embedding\.weight', "decoder_sa_type='ca_label'"),
    (r'transformer\.two_stage_wh_embedding\.weight', 'two_stage_learn_wh=True'),
    (r'transformer\.pat_embed_for_2stage', 'two_stage_pat_embed > 0'),
    (r'transformer\.encoder\.(enc_proj|enc_norm)\..*', "two_stage_type 'enceachlayer'"),
    (r'transformer\.encoder\.norm\..*', 'normalize_before=True (pre-norm encoder)'),
    (r'transformer\.decoder\.(query_scale|query_pos_sine_scale|ref_anchor_head)\..*',
     'a conditional (non-deformable) decoder'),
    (r'transformer\.decoder\.layers\.\d+\.(key_aware_proj|norm_channel|activ_channel)\..*',
     'key-aware / channel attention decoder layers'),
    (r'transformer\.patterns\.weight|hw_embed\.weight', 'query patterns / shared box size'),
    (r'backbone\.1\.(row|col)_embed\.weight', "learned position embedding"),
]
_ALIASES = (r'transformer\.decoder\.bbox_embed\..*', r'transformer\.decoder\.class_embed\..*')
_REQUIRED = (r'transformer\.tgt_embed\.weight', r'label_enc\.weight',
             r'transformer\.decoder\.ref_point_head\.layers\.0\.weight',
             r'transformer\.level_embed', r'transformer\.enc_out_class_embed\.weight')


def dino_model_cfg(state_dict, *, temperature: float, offset: float, **kwargs) -> dict:
    """The ``model`` overrides of a DINO: Deformable DETR's plus its differences."""
    model = deformable_model_cfg(state_dict, refine=True, two_stage=True, **kwargs)
    model['type'] = 'DINOX'
    model['positional_encoding'].update(temperature=temperature, offset=offset)
    return model


def convert_official_dino(source: Source) -> Converted:
    notes: List[str] = []
    args = training_args(source)
    weights = dict(source.state_dict)
    refuse_keys(weights, _UNSUPPORTED)
    drop_aliases(weights, 'transformer.decoder.bbox_embed.', 'bbox_embed.', notes)
    drop_aliases(weights, 'transformer.decoder.class_embed.', 'class_embed.', notes)
    in_channels, extra = projection_channels(weights, 'input_proj.', '0')
    dec_layers = count_indices(weights, r'transformer\.decoder\.layers\.')
    state_dict, unmatched = apply_key_rules(weights, _rules(len(in_channels), dec_layers))
    if unmatched:
        raise ConversionError(f'{len(unmatched)} keys of {source.path} have no rule in '
                              f'dino-official: {", ".join(unmatched[:8])}')
    add_batch_counters(state_dict, notes)

    levels, d = state_dict['level_embed'].shape
    if levels != len(in_channels) + extra:
        raise ConversionError(f'{levels} level embeddings but {len(in_channels) + extra} input '
                              'projections')
    stored = count_indices(state_dict, r'bbox_head\.cls_branches\.')
    if stored != dec_layers + 1:
        raise ConversionError(f'{stored} class heads: expected {dec_layers} decoder heads + the '
                              'encoder head (transformer.enc_out_class_embed)')
    num_classes = state_dict['bbox_head.cls_branches.0.weight'].shape[0]
    label = state_dict['dn_query_generator.label_embedding.weight']
    if label.shape[0] < num_classes:
        raise ConversionError(f'label_enc has {label.shape[0]} rows, fewer than the '
                              f'{num_classes} classes (args.dn_labelbook_size < num_classes)')
    if label.shape[0] > num_classes:
        state_dict['dn_query_generator.label_embedding.weight'] = label[:num_classes].clone()
        notes.append(f'label_enc rows {num_classes}..{label.shape[0] - 1} dropped (DINO sizes '
                     'it dn_labelbook_size + 1; mmdet one row per class; training-only '
                     '(denoising queries))')

    heads = int(arg_or_default(args, 'nheads', 8, notes, 'the number of attention heads'))
    enc_points = heads_and_points(
        state_dict, 'encoder.layers.0.self_attn.attention_weights.weight', levels, heads,
        args.get('enc_n_points'), 'encoder')
    dec_points = heads_and_points(
        state_dict, 'decoder.layers.0.cross_attn.attention_weights.weight', levels, heads,
        args.get('dec_n_points'), 'decoder')
    temp_h = arg_or_default(args, 'pe_temperatureH', 20, notes,
                            "the positional encoding's temperature")
    temp_w = args.get('pe_temperatureW', temp_h)
    if temp_h != temp_w:
        raise ConversionError(f'unsupported: pe_temperatureH={temp_h} != pe_temperatureW='
                              f"{temp_w} (mmdet's sine encoding has one temperature)")
    dilation = bool(args.get('dilation', False))
    backbone, depth = resnet_spec(state_dict, in_channels, dilation)
    if d != 256:
        raise ConversionError(f"unsupported hidden dim {d}: mmdet 3.3's DINO decoder encodes "
                              'reference points with 128 features per coordinate (256 only)')
    num_queries = state_dict['query_embedding.weight'].shape[0]
    classes = class_names(num_classes, notes)
    model = dino_model_cfg(
        state_dict, temperature=float(temp_h), offset=0.0, levels=levels, heads=heads,
        enc_points=enc_points, dec_points=dec_points, backbone=backbone,
        in_channels=in_channels, dropout=float(args.get('dropout', 0.0)),
        num_queries=num_queries)
    if args.get('dn_number') is not None:
        model['dn_cfg'] = dict(
            label_noise_scale=float(args.get('dn_label_noise_ratio', 0.5)),
            box_noise_scale=float(args.get('dn_box_noise_scale', 1.0)),
            group_cfg=dict(dynamic=True, num_groups=None, num_dn_queries=int(args['dn_number'])))
    notes.append(f'ResNet-{depth}{"-DC5" if dilation else ""}, {levels} levels, {heads} heads, '
                 f'{enc_points}/{dec_points} encoder/decoder points, {num_queries} queries, '
                 f'{num_classes} classes, positional temperature {temp_h}')
    return Converted(state_dict=state_dict, base_config='dino/dinox-4scale_r50_8xb2-12e_coco.py',
                     model=model, classes=classes, notes=notes)


@register_layout
class OfficialDinoLayout(KeyPatternLayout):
    name = 'dino-official'
    description = 'IDEA-Research/DINO .pth (DINO 4/5-scale, ResNet backbone)'
    key_patterns = [p for p, _ in _rules(1, 6)] + [
        r'transformer\.enc_out_class_embed\..*', r'transformer\.enc_out_bbox_embed\..*'] + list(
            _ALIASES) + [p for p, _ in _UNSUPPORTED]
    required_keys = _REQUIRED

    def convert(self, source: Source) -> Converted:
        return convert_official_dino(source)
