"""Ours -> HF transformers: publish a DETR / Deformable DETR trained or distilled here.

``to_hf(config, checkpoint, out_dir)`` writes an HF ``save_pretrained`` folder (config.json,
model.safetensors, preprocessor_config.json) that ``AutoModelForObjectDetection.from_pretrained``
loads, and that :func:`mmdet_detrx.converters.convert` turns back into the same weights bit for
bit. The key map is not a second table: the HF model is built from the derived HF config and each
of its keys is sent through the *forward* rules (hf_detr / hf_deformable_detr) to find the tensor
of ours it reads, so the two directions cannot drift apart. Needs transformers (the HF model is
built and loaded strictly before anything is written).

Backbones: mmdet's ``ResNet`` becomes an HF ``ResNetBackbone`` (no timm needed to load it);
``TorchvisionResNet`` with a dilated C5 (DC5) a timm ResNet with ``output_stride=16`` (HF has
DC5 for timm backbones only). An mmdet ResNet dilated the mmdet way has no HF equivalent.
"""
import json
import os
import os.path as osp
import re
import shutil
import tempfile
from typing import Dict, Optional, Sequence

import torch

from ._hf_common import TRANSFORMERS_INSTALL, backbone_rules
from ._registry import ConversionError, apply_key_rules
from .hf_deformable_detr import deformable_rules
from .hf_detr import transformer_rules, unpack_qkv

__all__ = ['to_hf']

_DETR_TYPES = {'DETR': 'detr', 'DETRX': 'detr', 'DeformableDETR': 'deformable_detr',
               'DeformableDETRX': 'deformable_detr'}


def _require_transformers():
    try:
        import transformers
    except ImportError as error:
        raise ConversionError('exporting to HF needs transformers: ' + TRANSFORMERS_INSTALL
                              ) from error
    return transformers


def _get(cfg, path: str, default=None):
    node = cfg
    for part in path.split('.'):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _hf_backbone(backbone: dict, out_indices: Sequence[int]):
    from transformers import ResNetConfig, TimmBackboneConfig
    depth = backbone['depth']
    dilations = tuple(backbone.get('dilations', (1, 1, 1, 1)))
    if backbone.get('deep_stem') or backbone.get('avg_down'):
        raise ConversionError('unsupported backbone for HF: deep_stem/avg_down ResNet')
    if backbone.get('type') not in ('ResNet', 'TorchvisionResNet', 'mmdet.ResNet'):
        raise ConversionError(f"unsupported backbone for HF: {backbone.get('type')!r} "
                              '(ResNet, TorchvisionResNet)')
    if dilations != (1, 1, 1, 1):
        if backbone.get('type') != 'TorchvisionResNet' or dilations != (1, 1, 1, 2):
            raise ConversionError(
                f"unsupported backbone for HF: {backbone.get('type')} dilations={dilations}; "
                "HF's DC5 is timm's (type='TorchvisionResNet', dilations=(1, 1, 1, 2))")
        if backbone.get('stem_channels', 64) != 64 or backbone.get('base_channels', 64) != 64:
            raise ConversionError('a DC5 export is a timm ResNet: standard widths only')
        return TimmBackboneConfig(backbone=f'resnet{depth}', out_indices=[i + 1 for i in
                                                                           out_indices],
                                  output_stride=16, features_only=True), 'timm'
    blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
              152: (3, 8, 36, 3)}[depth]
    bottleneck = depth >= 50
    base = backbone.get('base_channels', 64)
    expansion = 4 if bottleneck else 1
    stem = backbone.get('stem_channels') or base
    return ResNetConfig(
        embedding_size=stem, hidden_sizes=[base * expansion * 2**i for i in range(4)],
        depths=list(blocks), layer_type='bottleneck' if bottleneck else 'basic',
        downsample_in_bottleneck=backbone.get('style', 'pytorch') == 'caffe',
        out_features=[f'stage{i + 1}' for i in out_indices]), 'hf'


def _hf_config(model_cfg: dict, state_dict, classes: Sequence[str]):
    from transformers import AutoConfig
    detector = str(model_cfg.get('type', '')).split('.')[-1]
    model_type = _DETR_TYPES.get(detector)
    if model_type is None:
        raise ConversionError(f'exporting {detector!r} to HF is not supported (DETR, '
                              'DeformableDETR and their X variants)')
    if str(_get(model_cfg, 'encoder.layer_cfg.self_attn_cfg.type', '')) not in (
            '', 'MSDeformAttn', 'MultiheadAttention', 'MultiScaleDeformableAttention'):
        raise ConversionError('export the exact model: the encoder attention is '
                              f"{_get(model_cfg, 'encoder.layer_cfg.self_attn_cfg.type')!r} "
                              '(HF has no such attention; use the config without it)')
    backbone = dict(model_cfg['backbone'])
    out_indices = tuple(backbone.get('out_indices', (0, 1, 2, 3)))
    backbone_config, kind = _hf_backbone(backbone, out_indices)
    d = state_dict['encoder.layers.0.norms.0.weight'].shape[0]

    def count(prefix):
        return len({k.split('.')[2] for k in state_dict if k.startswith(prefix)})

    fields = dict(
        backbone_config=backbone_config, d_model=d,
        encoder_layers=count('encoder.layers.'), decoder_layers=count('decoder.layers.'),
        encoder_attention_heads=_get(model_cfg, 'encoder.layer_cfg.self_attn_cfg.num_heads', 8),
        decoder_attention_heads=_get(model_cfg, 'decoder.layer_cfg.self_attn_cfg.num_heads', 8),
        encoder_ffn_dim=state_dict['encoder.layers.0.ffn.layers.0.0.weight'].shape[0],
        decoder_ffn_dim=state_dict['decoder.layers.0.ffn.layers.0.0.weight'].shape[0],
        activation_function='relu', position_embedding_type='sine', auxiliary_loss=False,
        id2label={i: str(c) for i, c in enumerate(classes)},
        label2id={str(c): i for i, c in enumerate(classes)})
    num_queries = model_cfg.get('num_queries', 100)
    if model_type == 'detr':
        fields.update(num_queries=num_queries, dilation=kind == 'timm')
    else:
        two_stage = bool(model_cfg.get('as_two_stage'))
        refine = bool(model_cfg.get('with_box_refine'))
        if two_stage and not refine:
            raise ConversionError('HF Deformable DETR has two-stage only with box refinement '
                                  '(as_two_stage=True, with_box_refine=False given)')
        levels = model_cfg.get('num_feature_levels', 4)
        heads_enc = fields['encoder_attention_heads'] = _get(
            model_cfg, 'encoder.layer_cfg.self_attn_cfg.num_heads', 8)
        heads_dec = _get(model_cfg, 'decoder.layer_cfg.cross_attn_cfg.num_heads', 8)
        fields.update(
            num_queries=num_queries, two_stage=two_stage, with_box_refine=refine,
            two_stage_num_proposals=num_queries, num_feature_levels=levels,
            encoder_n_points=state_dict['encoder.layers.0.self_attn.attention_weights.weight']
            .shape[0] // (heads_enc * levels),
            decoder_n_points=state_dict['decoder.layers.0.cross_attn.attention_weights.weight']
            .shape[0] // (heads_dec * levels))
    return AutoConfig.for_model(model_type, **fields), model_type, kind


def _forward_rules(model_type: str, kind: str, num_backbone_outs: int):
    if model_type == 'detr':
        return backbone_rules(kind) + transformer_rules(conditional=False)
    return backbone_rules(kind) + deformable_rules(num_backbone_outs)


def _load_ours(checkpoint: str):
    from mmdet_detrx.utils.safe_checkpoint import load_checkpoint_file
    loaded = load_checkpoint_file(checkpoint, map_location='cpu')
    state_dict = loaded.get('state_dict', loaded) if isinstance(loaded, dict) else None
    if not isinstance(state_dict, dict):
        raise ConversionError(f'{checkpoint} holds no state dict')
    state_dict = {k[len('module.'):] if k.startswith('module.') else k: v
                  for k, v in state_dict.items()}
    meta = loaded.get('meta') or {}
    return state_dict, (meta.get('dataset_meta') or {}).get('classes')


def hf_state_dict_from_ours(hf_keys, state_dict: Dict[str, torch.Tensor], model_type: str,
                            kind: str, num_backbone_outs: int) -> Dict[str, torch.Tensor]:
    """Each HF key's tensor, found by mapping the key forward; ours left unused is an error."""
    rules = _forward_rules(model_type, kind, num_backbone_outs)
    ours = unpack_qkv(state_dict)
    shared = [k for k in hf_keys if re.match(r'model\.decoder\.(class|bbox)_embed\.', k)]
    mapped, unmatched = apply_key_rules({k: k for k in hf_keys if k not in shared}, rules)
    if unmatched:
        raise ConversionError(f'no rule for the HF keys {", ".join(unmatched[:8])}')
    out, used = {}, set()
    for our_key, hf_key in mapped.items():
        if our_key not in ours:
            raise ConversionError(f'the HF model needs {hf_key}, i.e. our {our_key}, which the '
                                  'checkpoint lacks')
        out[hf_key] = ours[our_key]
        used.add(our_key)
    for hf_key in shared:  # the decoder's references to the head modules
        out[hf_key] = out[hf_key[len('model.decoder.'):]]
    unused = [k for k in ours if k not in used and not k.endswith('num_batches_tracked')]
    if unused:
        raise ConversionError(f'{len(unused)} weights of ours have no place in the HF model: '
                              + ', '.join(unused[:8]))
    return out


def _preprocessor_config(model_cfg: dict) -> dict:
    preprocessor = model_cfg.get('data_preprocessor') or {}
    mean = preprocessor.get('mean', (123.675, 116.28, 103.53))
    std = preprocessor.get('std', (58.395, 57.12, 57.375))
    if not preprocessor.get('bgr_to_rgb', True):
        raise ConversionError('HF image processors take RGB: data_preprocessor.bgr_to_rgb=False '
                              'has no HF equivalent')
    return dict(image_processor_type='DetrImageProcessor', do_resize=True,
                size=dict(shortest_edge=800, longest_edge=1333), do_rescale=True,
                rescale_factor=1 / 255, do_normalize=True,
                image_mean=[float(m) / 255 for m in mean], image_std=[float(s) / 255 for s in std],
                do_pad=True, format='coco_detection')


def to_hf(config: str, checkpoint: str, out_dir: str,
          classes: Optional[Sequence[str]] = None) -> str:
    """Write our (config, checkpoint) as an HF ``save_pretrained`` folder ``out_dir``."""
    _require_transformers()
    from mmengine.config import Config
    from transformers import AutoModelForObjectDetection

    import mmdet_detrx  # noqa: F401  (mmdet_detrx:: bases)
    cfg = Config.fromfile(config)
    model_cfg = cfg.model.to_dict() if hasattr(cfg.model, 'to_dict') else dict(cfg.model)
    state_dict, stored_classes = _load_ours(checkpoint)
    classes = list(classes or stored_classes or (cfg.get('metainfo') or {}).get('classes') or [])
    num_classes = _get(model_cfg, 'bbox_head.num_classes')
    if not classes:
        classes = [f'class_{i}' for i in range(num_classes)]
    if num_classes is not None and len(classes) != num_classes:
        raise ConversionError(f'class-count mismatch: {len(classes)} class names, the config has '
                              f'num_classes={num_classes}')
    hf_config, model_type, kind = _hf_config(model_cfg, state_dict, classes)
    hf_model = AutoModelForObjectDetection.from_config(hf_config).eval()
    hf_keys = list(hf_model.state_dict())
    num_outs = len(tuple(model_cfg['backbone'].get('out_indices', (0, 1, 2, 3))))
    hf_weights = hf_state_dict_from_ours(hf_keys, state_dict, model_type, kind, num_outs)
    hf_model.load_state_dict(hf_weights, strict=True)

    parent = osp.dirname(osp.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix='.to-hf-', dir=parent)
    try:
        hf_model.save_pretrained(staging)
        with open(osp.join(staging, 'preprocessor_config.json'), 'w') as f:
            json.dump(_preprocessor_config(model_cfg), f, indent=2)
        if osp.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
        os.chmod(out_dir, 0o777 & ~_umask())
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _umask() -> int:
    from mmdet_detrx.utils.file_mode import current_umask
    return current_umask()
