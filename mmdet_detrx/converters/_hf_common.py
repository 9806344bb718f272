"""What the HF transformers layouts share: reading, config facts, the ResNet backbones.

Reading. With transformers installed, an HF folder is loaded by
``AutoModelForObjectDetection.from_pretrained`` and its ``state_dict()`` taken, so transformers'
own key-rename rules (``conversion_mapping.py``) decide the names; without it, the stored keys
are renamed by :data:`HUB_KEY_RENAMES`, the same rules for the three models as transformers
5.x has them (hub files keep the 4.x names: ``backbone.conv_encoder``, ``out_proj``,
``layers.N.fc1``, Conditional DETR's ``sa_*``/``ca_*``). Either way the layouts see transformers
5's module names.

Backbones. A timm ResNet (``use_timm_backbone``/``timm_backbone``: ``conv1``, ``layer1.0.conv1``,
... -- torchvision's names, which are mmdet's) or an HF ``ResNetBackbone`` (``embedder``,
``encoder.stages.S.layers.L.layer.J``); both with frozen BatchNorm (no ``num_batches_tracked``:
those buffers are added as 0 and reported).
"""
import contextlib
import re
from typing import Dict, List, Optional, Tuple

import torch

from ._registry import IMAGENET_MEAN_255, IMAGENET_STD_255, ConversionError, Source

__all__ = [
    'HUB_KEY_RENAMES', 'TRANSFORMERS_INSTALL', 'HFModel', 'read_hf_model', 'hf_model_type',
    'backbone_spec', 'backbone_rules', 'normalisation', 'class_names', 'require_option'
]

TRANSFORMERS_INSTALL = ('pip install transformers==5.23.0 (or pip install "mmdet-detrx[tests]"; '
                        'add timm for timm backbones)')

# transformers 5's WeightRenaming rules for DetrModel / ConditionalDetrModel / deformable_detr,
# as regex substitutions on the stored (4.x) names.
HUB_KEY_RENAMES = {
    'detr': [(r'backbone\.conv_encoder\.', 'backbone.'), (r'\.out_proj\.', '.o_proj.'),
             (r'layers\.(\d+)\.fc([12])\.', r'layers.\1.mlp.fc\2.')],
    'conditional_detr': [
        (r'backbone\.conv_encoder\.', 'backbone.'),
        (r'\.(self_attn|encoder_attn)\.out_proj\.', r'.\1.o_proj.'),
        (r'layers\.(\d+)\.fc([12])\.', r'layers.\1.mlp.fc\2.'),
        (r'decoder\.layers\.(\d+)\.sa_(qcontent|qpos|kcontent|kpos|v)_proj\.',
         lambda m: f'decoder.layers.{m[1]}.self_attn.{_SPLIT[m[2]]}_proj.'),
        (r'decoder\.layers\.(\d+)\.ca_(qcontent|qpos|kcontent|kpos|v|qpos_sine)_proj\.',
         lambda m: f'decoder.layers.{m[1]}.encoder_attn.{_SPLIT[m[2]]}_proj.'),
    ],
    'deformable_detr': [(r'backbone\.conv_encoder\.', 'backbone.'),
                        (r'\.self_attn\.out_proj\.', '.self_attn.o_proj.'),
                        (r'layers\.(\d+)\.fc([12])\.', r'layers.\1.mlp.fc\2.')],
}
_SPLIT = {'qcontent': 'q_content', 'qpos': 'q_pos', 'kcontent': 'k_content', 'kpos': 'k_pos',
          'v': 'v', 'qpos_sine': 'q_pos_sine'}


class HFModel:
    """An HF checkpoint as the layouts need it: ``config`` (a dict, transformers 5 field names
    where the model was loaded by transformers), ``state_dict`` (transformers 5 names) and
    ``read_with`` (how it was read, for the notes)."""

    def __init__(self, config: dict, state_dict: Dict[str, torch.Tensor], read_with: str):
        self.config = config
        self.state_dict = state_dict
        self.read_with = read_with


def hf_model_type(source: Source) -> Optional[str]:
    if source.hf_config is None:
        return None
    return source.hf_config.get('model_type')


def _rename_hub_keys(state_dict, model_type: str) -> Dict[str, torch.Tensor]:
    rules = [(re.compile(p), t) for p, t in HUB_KEY_RENAMES[model_type]]
    out = {}
    for key, value in state_dict.items():
        for pattern, template in rules:
            key = pattern.sub(template, key)
        out[key] = value
    return out


def transformers_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' info logging and progress bars off while it loads (the tool prints its
    own summary), restored afterwards."""
    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _check_label_count(source: Source, model_type: str) -> None:
    """config.json's labels against the stored classifier, before transformers would re-init a
    classifier of the wrong size."""
    labels = (source.hf_config or {}).get('id2label')
    if not labels:
        return
    for key in ('class_labels_classifier.weight', 'class_embed.0.weight',
                'model.decoder.class_embed.0.weight'):
        if key in source.state_dict:
            rows = source.state_dict[key].shape[0] - (model_type == 'detr')  # DETR: no-object
            if rows != len(labels):
                raise ConversionError(f'class-count mismatch: config.json id2label has '
                                      f'{len(labels)} classes, the classifier weights {rows}')
            return


def read_hf_model(source: Source, model_type: str) -> HFModel:
    """The HF checkpoint ``source`` (folder or bare state-dict file) with transformers 5 names."""
    _check_label_count(source, model_type)
    fallback = None
    if source.is_hf_folder and transformers_available():
        import transformers
        from transformers import AutoModelForObjectDetection
        try:
            with _quiet_transformers():
                model = AutoModelForObjectDetection.from_pretrained(source.path)
        except ImportError as error:  # e.g. a timm backbone without timm installed
            fallback = (f'transformers {transformers.__version__} could not build it ({error}); '
                        'read with the built-in hub key table instead')
        else:
            return HFModel(model.config.to_dict(), model.state_dict(),
                           f'transformers {transformers.__version__} from_pretrained')
    state_dict = _rename_hub_keys(source.state_dict, model_type)
    config = dict(source.hf_config or {})
    if not source.is_hf_folder:
        how = 'a bare state dict (hyper-parameters from key names and shapes)'
    else:
        how = fallback or 'the built-in hub key table (transformers not installed)'
    return HFModel(config, state_dict, how)


def require_option(config: dict, key: str, allowed, default, what: str):
    """``config[key]`` (or ``default``) if it is one of ``allowed``, else a clear error."""
    value = config.get(key, default)
    if value not in allowed:
        raise ConversionError(f'unsupported {what}: {key}={value!r} (supported: '
                              f'{", ".join(repr(a) for a in allowed)})')
    return value


# ------------------------------------------------------------------------------------ backbone
_TIMM_RESNETS = {'resnet18': 18, 'resnet34': 34, 'resnet50': 50, 'resnet101': 101,
                 'resnet152': 152}
_RESNET_DEPTHS = {('basic', (2, 2, 2, 2)): 18, ('basic', (3, 4, 6, 3)): 34,
                  ('bottleneck', (3, 4, 6, 3)): 50, ('bottleneck', (3, 4, 23, 3)): 101,
                  ('bottleneck', (3, 8, 36, 3)): 152}


def backbone_spec(config: dict, state_dict, default_out_indices: List[int]) -> Tuple[dict, str]:
    """mmdet backbone config and kind (``'timm'``/``'hf'``) of an HF DETR config dict.

    Accepts transformers 4.x config.json (``use_timm_backbone``, ``backbone``, ``dilation``,
    ``backbone_config``) and 5.x (``backbone_config`` with ``model_type`` ``timm_backbone`` or
    ``resnet``). ``default_out_indices`` (timm numbering, 1..4) apply where the config has none.
    Without a config, the kind is read from the key names (ResNet-50 for timm).
    """
    sub = config.get('backbone_config')
    if isinstance(sub, dict) and sub.get('model_type') == 'timm_backbone':
        kind, name = 'timm', sub.get('backbone')
        out_indices = sub.get('out_indices') or default_out_indices
        output_stride = sub.get('output_stride') or (16 if config.get('dilation') else None)
    elif isinstance(sub, dict) and sub.get('model_type') not in (None, 'resnet'):
        raise ConversionError(f"unsupported backbone: backbone_config.model_type="
                              f"{sub.get('model_type')!r} (supported: timm ResNets, HF "
                              "'resnet')")
    elif isinstance(sub, dict):
        kind, name, out_indices, output_stride = 'hf', None, None, None
    elif config:
        if config.get('use_timm_backbone', True):
            kind, name = 'timm', config.get('backbone') or 'resnet50'
            kwargs = config.get('backbone_kwargs') or {}
            out_indices = kwargs.get('out_indices') or default_out_indices
            output_stride = kwargs.get('output_stride') or (16 if config.get('dilation') else None)
        else:
            kind, name, out_indices, output_stride, sub = 'hf', None, None, None, {}
    elif any('.embedder.embedder.' in k for k in state_dict):  # bare state dict, HF ResNet
        sub = _hf_resnet_from_keys(state_dict, default_out_indices)
        kind, name, out_indices, output_stride = 'hf', None, None, None
    else:  # bare state dict, timm ResNet
        kind, name, out_indices, output_stride = 'timm', None, default_out_indices, None
    if kind == 'timm':
        return _timm_backbone(name, state_dict, out_indices, output_stride), 'timm'
    return _hf_resnet_backbone(sub or {}, config), 'hf'


def _hf_resnet_from_keys(state_dict, out_indices) -> dict:
    """An HF ResNetConfig dict read from an HF ResNet backbone's key names and shapes (the
    stride placement, ``downsample_in_bottleneck``, is in no shape: transformers' default)."""
    prefix = 'model.backbone.model.'
    stage_key = re.compile(re.escape(prefix) + r'encoder\.stages\.(\d)\.layers\.(\d+)\.')
    layers = {}
    for key in state_dict:
        match = stage_key.match(key)
        if match:
            layers.setdefault(int(match[1]), set()).add(int(match[2]))
    bottleneck = any('.layer.2.' in k for k in state_dict if k.startswith(prefix))
    last = 2 if bottleneck else 1
    return dict(
        model_type='resnet', layer_type='bottleneck' if bottleneck else 'basic',
        embedding_size=state_dict[prefix + 'embedder.embedder.convolution.weight'].shape[0],
        depths=[len(layers[s]) for s in sorted(layers)],
        hidden_sizes=[state_dict[f'{prefix}encoder.stages.{s}.layers.0.layer.{last}.'
                                 'convolution.weight'].shape[0] for s in sorted(layers)],
        out_features=[f'stage{i}' for i in out_indices])


def _timm_depth_from_keys(state_dict) -> Tuple[int, bool]:
    blocks = [len({int(m[1]) for k in state_dict
                   for m in [re.search(rf'backbone\.model\.layer{s}\.(\d+)\.', k)] if m})
              for s in range(1, 5)]
    bottleneck = any('.conv3.' in k for k in state_dict if '.backbone.model.' in k)
    return _RESNET_DEPTHS.get(('bottleneck' if bottleneck else 'basic', tuple(blocks))), bottleneck


def _stage_dilations(output_stride: Optional[int]):
    if output_stride in (None, 32):
        return (1, 2, 2, 2), (1, 1, 1, 1)
    if output_stride == 16:
        return (1, 2, 2, 1), (1, 1, 1, 2)
    if output_stride == 8:
        return (1, 2, 1, 1), (1, 1, 2, 4)
    raise ConversionError(f'unsupported backbone output_stride={output_stride} (32, 16, 8)')


def _timm_backbone(name: Optional[str], state_dict, out_indices, output_stride) -> dict:
    depth, _ = _timm_depth_from_keys(state_dict)
    if name is not None:
        base = name.split('.')[0]  # 'resnet50.a1_in1k' -> 'resnet50'
        if base not in _TIMM_RESNETS:
            raise ConversionError(f'unsupported timm backbone {name!r} (supported: '
                                  f'{", ".join(_TIMM_RESNETS)})')
        depth = _TIMM_RESNETS[base]
    if depth is None:
        raise ConversionError('the backbone keys are not those of a timm ResNet-18/34/50/101/152')
    strides, dilations = _stage_dilations(output_stride)
    indices = tuple(int(i) - 1 for i in out_indices)
    if any(i < 0 or i > 3 for i in indices):
        raise ConversionError(f'unsupported backbone out_indices={list(out_indices)} (1..4)')
    return dict(_delete_=True, type='TorchvisionResNet' if output_stride else 'ResNet',
                depth=depth, num_stages=4, strides=strides, dilations=dilations,
                out_indices=indices, frozen_stages=1,
                norm_cfg=dict(type='BN', requires_grad=False), norm_eval=True, style='pytorch',
                init_cfg=None)


def _hf_resnet_backbone(sub: dict, config: dict) -> dict:
    layer_type = sub.get('layer_type', 'bottleneck')
    depths = tuple(sub.get('depths', (3, 4, 6, 3)))
    hidden = list(sub.get('hidden_sizes', (256, 512, 1024, 2048)))
    embedding = sub.get('embedding_size', 64)
    depth = _RESNET_DEPTHS.get((layer_type, depths))
    if depth is None:
        raise ConversionError(f'unsupported HF ResNet: layer_type={layer_type!r} depths='
                              f'{list(depths)} (mmdet ResNet-18/34/50/101/152 block counts)')
    expansion = 4 if layer_type == 'bottleneck' else 1
    base = hidden[0] // expansion
    if hidden != [base * expansion * 2**i for i in range(4)]:
        raise ConversionError(f'unsupported HF ResNet hidden_sizes={hidden}: mmdet doubles the '
                              'width each stage from hidden_sizes[0]')
    if sub.get('downsample_in_first_stage', False):
        raise ConversionError('unsupported HF ResNet option downsample_in_first_stage=True')
    require_option(sub, 'hidden_act', ('relu', ), 'relu', 'HF ResNet activation')
    if config.get('dilation'):
        raise ConversionError('unsupported option: dilation=True with an HF ResNet backbone '
                              '(transformers supports DC5 with timm backbones only)')
    stage_names = ['stem', 'stage1', 'stage2', 'stage3', 'stage4']
    out_features = sub.get('out_features') or (
        [stage_names[i] for i in sub['out_indices']] if sub.get('out_indices') else ['stage4'])
    indices = tuple(stage_names.index(f) - 1 for f in out_features)
    if any(i < 0 for i in indices):
        raise ConversionError(f'unsupported backbone out_features={out_features}')
    return dict(_delete_=True, type='ResNet', depth=depth, num_stages=4, stem_channels=embedding,
                base_channels=base, out_indices=indices, frozen_stages=1,
                norm_cfg=dict(type='BN', requires_grad=False), norm_eval=True,
                style='caffe' if sub.get('downsample_in_bottleneck') else 'pytorch',
                init_cfg=None)


def backbone_rules(kind: str, prefix: str = 'model.backbone.model.') -> list:
    """Key rules HF backbone -> mmdet ``backbone.*`` (timm names are mmdet's)."""
    p = re.escape(prefix)
    if kind == 'timm':
        return [(p + r'(.*)', r'backbone.\1')]
    conv = {'0': '1', '1': '2', '2': '3'}
    return [
        (p + r'embedder\.embedder\.convolution\.(weight)', r'backbone.conv1.\1'),
        (p + r'embedder\.embedder\.normalization\.(.*)', r'backbone.bn1.\1'),
        (p + r'encoder\.stages\.(\d)\.layers\.(\d+)\.shortcut\.convolution\.(.*)',
         lambda m: f'backbone.layer{int(m[1]) + 1}.{m[2]}.downsample.0.{m[3]}'),
        (p + r'encoder\.stages\.(\d)\.layers\.(\d+)\.shortcut\.normalization\.(.*)',
         lambda m: f'backbone.layer{int(m[1]) + 1}.{m[2]}.downsample.1.{m[3]}'),
        (p + r'encoder\.stages\.(\d)\.layers\.(\d+)\.layer\.(\d)\.convolution\.(.*)',
         lambda m: f'backbone.layer{int(m[1]) + 1}.{m[2]}.conv{conv[m[3]]}.{m[4]}'),
        (p + r'encoder\.stages\.(\d)\.layers\.(\d+)\.layer\.(\d)\.normalization\.(.*)',
         lambda m: f'backbone.layer{int(m[1]) + 1}.{m[2]}.bn{conv[m[3]]}.{m[4]}'),
    ]


# ------------------------------------------------------------------------- classes, pixels
def class_names(config: dict, num_classes: int, notes: List[str]) -> List[str]:
    id2label = config.get('id2label') or {}
    labels = {int(k): str(v) for k, v in id2label.items()}
    if labels and len(labels) != num_classes:
        raise ConversionError(f'class-count mismatch: config.json id2label has {len(labels)} '
                              f'classes, the classifier weights {num_classes}')
    if not labels:
        notes.append(f'no id2label: classes named class_0 .. class_{num_classes - 1}')
        return [f'class_{i}' for i in range(num_classes)]
    return [labels.get(i, f'class_{i}') for i in range(num_classes)]


def normalisation(source: Source, notes: List[str]):
    """(mean, std) on the 0-255 scale from ``preprocessor_config.json`` (HF's image processor
    rescales by ``rescale_factor`` then normalises), or ImageNet's, as HF's DETR processors."""
    pre = source.preprocessor_config
    if not pre:
        notes.append('no preprocessor_config.json: ImageNet mean/std assumed (the default of '
                     "HF's DETR image processors)")
        return IMAGENET_MEAN_255, IMAGENET_STD_255
    if not pre.get('do_normalize', True):
        return (0.0, 0.0, 0.0), tuple(1.0 / pre.get('rescale_factor', 1 / 255) for _ in range(3))
    factor = pre.get('rescale_factor', 1 / 255) if pre.get('do_rescale', True) else 1.0
    mean = tuple(float(m) / factor for m in pre.get('image_mean', (0.485, 0.456, 0.406)))
    std = tuple(float(s) / factor for s in pre.get('image_std', (0.229, 0.224, 0.225)))
    return mean, std
