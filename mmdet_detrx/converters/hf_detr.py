"""HF transformers ``DetrForObjectDetection`` and ``ConditionalDetrForObjectDetection`` ->
``DETRX`` / ``ConditionalDETRX`` (hub: facebook/detr-resnet-50, facebook/detr-resnet-50-dc5,
microsoft/conditional-detr-resnet-50, ...).

The two module trees side by side (transformers 5 names, ``model.`` dropped, left; ours, right;
``E``/``D`` = ``encoder.layers.N`` / ``decoder.layers.N``)::

    backbone.model.*                      backbone.*            (timm / HF ResNet: _hf_common)
    input_projection                      neck.convs.0.conv
    query_position_embeddings             query_embedding
    E.self_attn.{q,k,v}_proj              E.self_attn.attn.in_proj_*   (packed q; k; v)
    E.self_attn.o_proj                    E.self_attn.attn.out_proj
    E.{self_attn,final}_layer_norm        E.norms.{0,1}
    E.mlp.fc1 / fc2                       E.ffn.layers.0.0 / ffn.layers.1
    D.self_attn / D.encoder_attn          D.self_attn.attn / D.cross_attn.attn        (DETR)
    D.{self_attn,encoder_attn}.{q_content,q_pos,k_content,k_pos,v,q_pos_sine}_proj
                                          D.{self_attn,cross_attn}.{qcontent,...}_proj (Cond.)
    D.{self_attn,encoder_attn,final}_layer_norm   D.norms.{0,1,2}
    decoder.layernorm                     decoder.post_norm
    decoder.{query_scale,ref_point_head}  decoder.{query_scale,ref_point_head}        (Cond.)
    class_labels_classifier               bbox_head.fc_cls
    bbox_predictor.layers.{0,1,2}         bbox_head.reg_ffn.layers.0.0 / .layers.1 / fc_reg

DETR's classifier has ``num_labels + 1`` outputs, the last "no object" -- mmdet's softmax
``DETRHead`` has ``num_classes + 1`` with background last: copied as is. Conditional DETR's has
``num_labels`` sigmoid outputs, as mmdet's ``ConditionalDETRHead``. Both decoders end in a
LayerNorm (mmdet's ``post_norm``). Conditional DETR's ``encoder_attn.q_pos_proj`` exists in
decoder layer 0 only, in both code bases.
"""
import re
from typing import Dict, List

import torch

from ._hf_common import (backbone_rules, backbone_spec, class_names, hf_model_type,
                         normalisation, read_hf_model, require_option)
from ._original_common import add_batch_counters
from ._registry import (ConversionError, Converted, Layout, LayoutMatch, Source,
                        apply_key_rules, match_key_patterns, register_layout,
                        register_source_check)
from ._hf_common import _rename_hub_keys

__all__ = ['HFDetrLayout', 'HFConditionalDetrLayout', 'pack_qkv', 'unpack_qkv',
           'transformer_rules', 'SUPPORTED_HF_MODEL_TYPES']

SUPPORTED_HF_MODEL_TYPES = ('detr', 'conditional_detr', 'deformable_detr')
_ARCHITECTURES = ('DetrForObjectDetection', 'ConditionalDetrForObjectDetection',
                  'DeformableDetrForObjectDetection')

_W = r'(weight|bias)'


def _attention_rules(src: str, dst: str, conditional: bool, cross: bool) -> list:
    """``src`` (an HF attention module; its one group is the layer index) -> ``dst`` (ours)."""
    if not conditional:
        return [(src + rf'\.([qkv])_proj\.{_W}', dst + r'.attn.in_proj_\3#\2'),
                (src + rf'\.o_proj\.{_W}', dst + r'.attn.out_proj.\2')]
    names = ['q_content', 'q_pos', 'k_content', 'k_pos', 'v'] + (['q_pos_sine'] if cross else [])
    ours = {'q_content': 'qcontent', 'q_pos': 'qpos', 'k_content': 'kcontent', 'k_pos': 'kpos',
            'v': 'v', 'q_pos_sine': 'qpos_sine'}
    return [(src + rf'\.{name}_proj\.{_W}', dst + f'.{ours[name]}_proj.' + r'\2')
            for name in names] + [(src + rf'\.o_proj\.{_W}', dst + r'.out_proj.\2')]


def transformer_rules(conditional: bool) -> list:
    """HF (transformers 5 names) -> ours, for the DETR and Conditional DETR transformer + head."""
    enc, dec = r'model\.encoder\.layers\.(\d+)', r'model\.decoder\.layers\.(\d+)'
    rules = [
        (rf'model\.input_projection\.{_W}', r'neck.convs.0.conv.\1'),
        (r'model\.query_position_embeddings\.weight', 'query_embedding.weight'),
        *_attention_rules(enc + r'\.self_attn', r'encoder.layers.\1.self_attn', False, False),
        (enc + rf'\.self_attn_layer_norm\.{_W}', r'encoder.layers.\1.norms.0.\2'),
        (enc + rf'\.mlp\.fc1\.{_W}', r'encoder.layers.\1.ffn.layers.0.0.\2'),
        (enc + rf'\.mlp\.fc2\.{_W}', r'encoder.layers.\1.ffn.layers.1.\2'),
        (enc + rf'\.final_layer_norm\.{_W}', r'encoder.layers.\1.norms.1.\2'),
        *_attention_rules(dec + r'\.self_attn', r'decoder.layers.\1.self_attn', conditional,
                          False),
        *_attention_rules(dec + r'\.encoder_attn', r'decoder.layers.\1.cross_attn',
                          conditional, True),
        (dec + rf'\.self_attn_layer_norm\.{_W}', r'decoder.layers.\1.norms.0.\2'),
        (dec + rf'\.encoder_attn_layer_norm\.{_W}', r'decoder.layers.\1.norms.1.\2'),
        (dec + rf'\.final_layer_norm\.{_W}', r'decoder.layers.\1.norms.2.\2'),
        (dec + rf'\.mlp\.fc1\.{_W}', r'decoder.layers.\1.ffn.layers.0.0.\2'),
        (dec + rf'\.mlp\.fc2\.{_W}', r'decoder.layers.\1.ffn.layers.1.\2'),
        (rf'model\.decoder\.layernorm\.{_W}', r'decoder.post_norm.\1'),
        (rf'class_labels_classifier\.{_W}', r'bbox_head.fc_cls.\1'),
        (rf'bbox_predictor\.layers\.0\.{_W}', r'bbox_head.reg_ffn.layers.0.0.\1'),
        (rf'bbox_predictor\.layers\.1\.{_W}', r'bbox_head.reg_ffn.layers.1.\1'),
        (rf'bbox_predictor\.layers\.2\.{_W}', r'bbox_head.fc_reg.\1'),
    ]
    if conditional:
        rules += [(rf'model\.decoder\.(query_scale|ref_point_head)\.layers\.(\d)\.{_W}',
                   r'decoder.\1.layers.\2.\3')]
    return rules


def pack_qkv(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Join ``X.in_proj_weight#q``/``#k``/``#v`` into ``X.in_proj_weight`` (q; k; v rows), as
    ``nn.MultiheadAttention`` stores them."""
    out, parts = {}, {}
    for key, value in state_dict.items():
        if '#' in key:
            name, part = key.split('#')
            parts.setdefault(name, {})[part] = value
        else:
            out[key] = value
    for name, qkv in parts.items():
        if set(qkv) != {'q', 'k', 'v'}:
            raise ConversionError(f'{name}: only {sorted(qkv)} of q, k, v projections found')
        out[name] = torch.cat([qkv['q'], qkv['k'], qkv['v']], dim=0)
    return out


def unpack_qkv(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The inverse of :func:`pack_qkv`."""
    out = {}
    for key, value in state_dict.items():
        if re.search(r'\.attn\.in_proj_(weight|bias)$', key):
            for part, chunk in zip('qkv', value.chunk(3, dim=0)):
                out[f'{key}#{part}'] = chunk.clone()
        else:
            out[key] = value
    return out


def _hf_key_patterns(model_type: str, conditional: bool) -> List[str]:
    return [p for p, _ in transformer_rules(conditional)] + [r'model\.backbone\.model\..*']


def _check_transformer_options(config: dict) -> None:
    require_option(config, 'position_embedding_type', ('sine', ), 'sine',
                   "position embedding (mmdet's DETRs build a sine embedding)")
    require_option(config, 'activation_function', ('relu', ), 'relu', 'activation')
    if config.get('num_channels', 3) != 3:
        raise ConversionError(f"unsupported option num_channels={config['num_channels']}")


def _infer(config: dict, state_dict, notes: List[str]) -> dict:
    """Hyper-parameters: config.json's, or read from the weights' shapes (bare state dict)."""
    def count(prefix):
        return len({int(m[1]) for k in state_dict
                    for m in [re.match(prefix + r'(\d+)\.', k)] if m})

    d_model = state_dict['model.query_position_embeddings.weight'].shape[1]
    facts = dict(
        d_model=config.get('d_model', d_model),
        num_queries=state_dict['model.query_position_embeddings.weight'].shape[0],
        encoder_layers=count(r'model\.encoder\.layers\.'),
        decoder_layers=count(r'model\.decoder\.layers\.'),
        encoder_ffn_dim=state_dict['model.encoder.layers.0.mlp.fc1.weight'].shape[0],
        decoder_ffn_dim=state_dict['model.decoder.layers.0.mlp.fc1.weight'].shape[0],
        encoder_attention_heads=config.get('encoder_attention_heads'),
        decoder_attention_heads=config.get('decoder_attention_heads'),
        dropout=config.get('dropout', 0.1), attention_dropout=config.get('attention_dropout', 0.0))
    for key in ('encoder_attention_heads', 'decoder_attention_heads'):
        if facts[key] is None:
            facts[key] = 8
            notes.append(f'{key} not in the source (a bare state dict): 8 assumed, as HF')
    if config.get('auxiliary_loss'):
        notes.append('config.json has auxiliary_loss=True: HF then feeds each decoder layer the '
                     "LayerNorm'ed output of the previous one, mmdet (and the original DETR) the "
                     'raw one, so outputs differ from HF with that flag (not from the original)')
    return facts


def convert_hf_detr(source: Source, conditional: bool) -> Converted:
    model_type = 'conditional_detr' if conditional else 'detr'
    hf = read_hf_model(source, model_type)
    config, weights = hf.config, dict(hf.state_dict)
    notes = [f'read with {hf.read_with}']
    _check_transformer_options(config)
    facts = _infer(config, weights, notes)
    backbone, kind = backbone_spec(config, weights, default_out_indices=[1, 2, 3, 4])
    rules = backbone_rules(kind) + transformer_rules(conditional)
    state_dict, unmatched = apply_key_rules(weights, rules)
    if unmatched:
        raise ConversionError(f'{len(unmatched)} keys of {source.path} have no rule in '
                              f'hf-{model_type.replace("_", "-")}: {", ".join(unmatched[:8])}')
    state_dict = pack_qkv(state_dict)
    # timm features_only backbones with out_indices < 4 drop the later stages' keys;
    # mmdet's ResNet always has 4 stages (the missing ones are named by the strict load).
    last_stage = max(backbone['out_indices'])
    add_batch_counters(state_dict, notes)
    num_outputs = state_dict['bbox_head.fc_cls.weight'].shape[0]
    num_classes = num_outputs if conditional else num_outputs - 1
    classes = class_names(config, num_classes, notes)
    mean, std = normalisation(source, notes)

    d, heads = facts['d_model'], facts['encoder_attention_heads']
    expansion = 4 if backbone['depth'] >= 50 else 1
    channels = backbone.get('base_channels', 64) * expansion * 2**last_stage
    ffn = dict(embed_dims=d, feedforward_channels=facts['encoder_ffn_dim'],
               ffn_drop=facts['dropout'])
    dec_ffn = dict(ffn, feedforward_channels=facts['decoder_ffn_dim'])
    if conditional:
        if d != 256:
            raise ConversionError(f"unsupported d_model={d}: mmdet's Conditional DETR decoder "
                                  'hard-codes a 256-dim sine embedding of its reference points')
        dec_heads = facts['decoder_attention_heads']
        dec_layer = dict(
            self_attn_cfg=dict(_delete_=True, embed_dims=d, num_heads=dec_heads,
                               attn_drop=facts['attention_dropout'], cross_attn=False),
            cross_attn_cfg=dict(_delete_=True, embed_dims=d, num_heads=dec_heads,
                                attn_drop=facts['attention_dropout'], cross_attn=True),
            ffn_cfg=dec_ffn)
        detector, head = 'ConditionalDETRX', 'ConditionalDETRHead'
        base = 'mmdet::conditional_detr/conditional-detr_r50_8xb2-50e_coco.py'
    else:
        attn = dict(embed_dims=d, num_heads=facts['decoder_attention_heads'],
                    dropout=facts['attention_dropout'], batch_first=True)
        dec_layer = dict(self_attn_cfg=attn, cross_attn_cfg=attn, ffn_cfg=dec_ffn)
        detector, head = 'DETRX', 'DETRHead'
        base = 'mmdet::detr/detr_r50_8xb2-150e_coco.py'
    model = dict(
        type=detector,
        num_queries=facts['num_queries'],
        backbone=dict(backbone, out_indices=(last_stage, )),
        neck=dict(in_channels=[channels], out_channels=d),
        encoder=dict(num_layers=facts['encoder_layers'], layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=d, num_heads=heads, dropout=facts['attention_dropout'],
                               batch_first=True),
            ffn_cfg=ffn)),
        decoder=dict(num_layers=facts['decoder_layers'], layer_cfg=dec_layer),
        positional_encoding=dict(num_feats=d // 2),
        bbox_head=dict(type=head, embed_dims=d))
    return Converted(state_dict=state_dict, base_config=base, model=model, classes=classes,
                     mean=mean, std=std, notes=notes)


class _HFLayout(Layout):
    model_type = ''
    architecture = ''
    required = ()

    def _normalised_keys(self, source: Source):
        return _rename_hub_keys(source.state_dict, self.model_type)

    def key_patterns(self) -> List[str]:
        raise NotImplementedError

    def match(self, source: Source) -> LayoutMatch:
        model_type = hf_model_type(source)
        if model_type is not None and model_type != self.model_type:
            return LayoutMatch(score=0.0, reason=f'config.json model_type is {model_type!r}, '
                               f'not {self.model_type!r}')
        keys = self._normalised_keys(source)
        return match_key_patterns(keys, self.key_patterns(), self.required)


@register_layout
class HFDetrLayout(_HFLayout):
    name = 'hf-detr'
    description = 'HF transformers DetrForObjectDetection (timm or HF ResNet backbone, DC5)'
    model_type = 'detr'
    required = (r'model\.decoder\.layers\.0\.encoder_attn\.q_proj\.weight',
                r'class_labels_classifier\.weight')

    def key_patterns(self):
        return _hf_key_patterns('detr', conditional=False)

    def convert(self, source: Source) -> Converted:
        return convert_hf_detr(source, conditional=False)


@register_layout
class HFConditionalDetrLayout(_HFLayout):
    name = 'hf-conditional-detr'
    description = 'HF transformers ConditionalDetrForObjectDetection'
    model_type = 'conditional_detr'
    required = (r'model\.decoder\.query_scale\.layers\.0\.weight',
                r'class_labels_classifier\.weight')

    def key_patterns(self):
        return _hf_key_patterns('conditional_detr', conditional=True)

    def convert(self, source: Source) -> Converted:
        return convert_hf_detr(source, conditional=True)


@register_source_check
def check_hf_architecture(source: Source) -> None:
    """An HF folder of another model type or head is named as such."""
    if source.hf_config is None:
        return
    model_type = source.hf_config.get('model_type')
    architectures = source.hf_config.get('architectures') or []
    if model_type not in SUPPORTED_HF_MODEL_TYPES:
        raise ConversionError(
            f'{source.path}: unsupported HF architecture model_type={model_type!r} '
            f'({", ".join(architectures) or "no architectures listed"}); supported: '
            f'{", ".join(SUPPORTED_HF_MODEL_TYPES)} ({", ".join(_ARCHITECTURES)})')
    other = [a for a in architectures if a not in _ARCHITECTURES]
    if other:
        raise ConversionError(f'{source.path}: unsupported HF architecture {other[0]} '
                              f'(supported: {", ".join(_ARCHITECTURES)})')
    # options that change the module tree, before detection would only see odd keys
    _check_transformer_options(source.hf_config)
