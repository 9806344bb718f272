"""Let mmdet's DETR-family detectors take their attention modules from the registry.

mmdet 3.x's transformer layers construct ``MultiheadAttention`` / ``MultiScaleDeformableAttention``
by class, so ``self_attn_cfg=dict(type=...)`` is rejected upstream. The detectors here accept a
``type`` in ``encoder.layer_cfg`` / ``decoder.layer_cfg`` (``self_attn_cfg``, ``cross_attn_cfg``):
upstream builds its layers from the same config minus the extra keys, then each such attention is
replaced by ``MODELS.build(cfg)``. Parameter names stay upstream's, so checkpoints load strictly.

A registered attention must subclass the mmcv attention it replaces (``MultiheadAttention`` or
``MultiScaleDeformableAttention``): that is what keeps it a drop-in, and it tells which of the
config keys upstream understands.

Naming a registered attention under mmdet's *plain* detector (``type='DeformableDETR'``) used to
fail deep inside mmcv with ``TypeError: ... unexpected keyword argument 'type'``. No code of ours
runs there, so :func:`check_attention_types` inspects every model config before it is built
(installed around the ``build_func`` of mmengine's and mmdet's ``MODELS`` on import, the one
hook every model build passes; :func:`install_attention_type_check`, called by the package's
``__init__``) and raises a ``TypeError`` that names the ``...X`` detector to use.

The ``...X`` detectors also take ``conv_memory_format`` (:class:`ChannelsLastMixin`): on CPU
their backbone and neck run channels-last by default; and ``fold_frozen_bn``
(:class:`FoldFrozenBNMixin`): their backbone's eval-mode BatchNorms fold into the convolutions;
and ``pack_linear`` (:class:`PackLinearMixin`): their linear layers run CPU float32 inference on
oneDNN with prepacked weights; and ``native_dropout`` (:class:`NativeDropoutMixin`): their
dropouts run the native hashed-mask dropout in CPU training.
"""
import copy
import functools
import inspect
from typing import Dict, List, Optional, Tuple

import torch
from mmdet.models.detectors import DETR, DINO, ConditionalDETR, DeformableDETR
from mmdet.models.detectors.base_detr import DetectionTransformer
from mmdet.registry import MODELS
from mmengine.config import ConfigDict
from mmengine.registry import MODELS as MMENGINE_MODELS

from .channels_last import ChannelsLastMixin
from .dino_ref_point_head import adapt_ref_point_head, fit_ref_point_head
from .fold_frozen_bn import FoldFrozenBNMixin
from .native_dropout import NativeDropoutMixin
from .packed_linear import PackLinearMixin, pack_linears

__all__ = ['RegistryAttentionMixin', 'DETRX', 'ConditionalDETRX', 'DeformableDETRX', 'DINOX',
           'check_attention_types', 'install_attention_type_check']

_ATTENTION_CFG_KEYS = ('self_attn_cfg', 'cross_attn_cfg')


def _upstream_keys(attn_type) -> set:
    """Constructor arguments of the mmcv class that ``attn_type`` derives from."""
    cls = MODELS.get(attn_type) if isinstance(attn_type, str) else attn_type
    if cls is None:
        raise KeyError(f'attention type {attn_type!r} is not registered in MODELS; is '
                       "custom_imports=dict(imports=['mmdet_detrx']) in the config?")
    for base in cls.__mro__:
        if base.__module__.startswith('mmcv.'):
            return set(inspect.signature(base.__init__).parameters) - {'self', 'kwargs'}
    raise TypeError(f'attention type {cls.__name__} must subclass the mmcv attention it '
                    'replaces (MultiheadAttention or MultiScaleDeformableAttention)')


def _split_attention_types(coder_cfg: Optional[dict]) -> Tuple[Optional[dict], Dict[str, dict]]:
    """Return (cfg upstream can build, {attn_cfg_key: full registry cfg})."""
    if coder_cfg is None:
        return None, {}
    coder_cfg = copy.deepcopy(dict(coder_cfg))
    layer_cfg = coder_cfg.get('layer_cfg')
    if layer_cfg is None:
        return coder_cfg, {}
    layer_cfg = dict(layer_cfg)
    swaps = {}
    for key in _ATTENTION_CFG_KEYS:
        attn_cfg = layer_cfg.get(key)
        if attn_cfg is None or 'type' not in attn_cfg:
            continue
        attn_cfg = dict(attn_cfg)
        keep = _upstream_keys(attn_cfg['type'])
        swaps[key] = attn_cfg
        layer_cfg[key] = {k: v for k, v in attn_cfg.items() if k in keep}
    coder_cfg['layer_cfg'] = layer_cfg
    return coder_cfg, swaps


def _swap_attentions(coder, swaps: Dict[str, dict]) -> None:
    for index, layer in enumerate(coder.layers):
        for key, full_cfg in swaps.items():
            # Upstream may have completed its copy of the config (e.g. batch_first=True).
            cfg = ConfigDict({**getattr(layer, key), **full_cfg})
            module = MODELS.build(cfg)
            if hasattr(module, 'select_layer'):  # per-layer settings, e.g. ACT bucket widths
                module.select_layer(index, len(coder.layers))
            setattr(layer, key[:-len('_cfg')], module)
            setattr(layer, key, cfg)


def float32_instances(instances):
    """``instances`` (an ``InstanceData``) with its reduced-precision float fields in float32.

    Under CPU bf16 autocast (``tools/test.py --amp``, mmengine's ``test_cfg.fp16``) a DETR head
    returns bf16 boxes and scores, which numpy, and so mmdet's ``CocoMetric``, cannot read.
    """
    for key, value in instances.items():
        if isinstance(value, torch.Tensor) and value.dtype in (torch.bfloat16, torch.float16):
            instances[key] = value.float()
    return instances


class RegistryAttentionMixin:
    """Put before an mmdet DETR-family detector in the bases to make its attentions swappable.

    Predictions leave the detector in float32 whatever autocast dtype ran it
    (:func:`float32_instances`).
    """

    def __init__(self, *args, encoder=None, decoder=None, **kwargs):
        encoder, encoder_swaps = _split_attention_types(encoder)
        decoder, decoder_swaps = _split_attention_types(decoder)
        super().__init__(*args, encoder=encoder, decoder=decoder, **kwargs)
        _swap_attentions(self.encoder, encoder_swaps)
        _swap_attentions(self.decoder, decoder_swaps)

    def add_pred_to_datasample(self, data_samples, results_list):
        return super().add_pred_to_datasample(
            data_samples, [float32_instances(results) for results in results_list])


@MODELS.register_module()
class DETRX(NativeDropoutMixin, PackLinearMixin, RegistryAttentionMixin, ChannelsLastMixin,
            FoldFrozenBNMixin, DETR):
    """mmdet's DETR whose encoder/decoder attentions may be any registered type (e.g. ACT)."""


@MODELS.register_module()
class ConditionalDETRX(NativeDropoutMixin, PackLinearMixin, RegistryAttentionMixin,
                       ChannelsLastMixin, FoldFrozenBNMixin, ConditionalDETR):
    """mmdet's Conditional DETR whose attentions may be any registered type (e.g. ACT).

    Its encoder is DETR's (exact multi-head self-attention), so ACT drops in exactly as for DETR;
    its conditional cross-attention makes it converge several times faster than DETR.
    """


@MODELS.register_module()
class DeformableDETRX(NativeDropoutMixin, PackLinearMixin, RegistryAttentionMixin,
                      ChannelsLastMixin, FoldFrozenBNMixin, DeformableDETR):
    """mmdet's Deformable DETR whose attentions may be any registered type."""


@MODELS.register_module()
class DINOX(NativeDropoutMixin, PackLinearMixin, RegistryAttentionMixin, ChannelsLastMixin,
            FoldFrozenBNMixin, DINO):
    """mmdet's DINO whose attentions may be any registered type.

    On OneDL's mmdetection 3.5, whose DINO decoder encodes reference points more widely, it also
    loads mmdet 3.3 checkpoints exactly; on mmdet 3.3 it also builds at widths other than 256
    (:mod:`.dino_ref_point_head`).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        fit_ref_point_head(self.decoder)
        adapt_ref_point_head(self.decoder)
        if self.pack_linear:  # fit_ref_point_head may have built a new MLP
            pack_linears(self.decoder.ref_point_head)


# mmdet's plain detector -> ours with registry-built attentions.
_REGISTRY_ATTENTION_DETECTORS = {DETR: DETRX, ConditionalDETR: ConditionalDETRX,
                                 DeformableDETR: DeformableDETRX, DINO: DINOX}


def _typed_attention_keys(cfg) -> List[str]:
    """``['encoder.layer_cfg.self_attn_cfg.type=...', ...]``: attention cfgs that name a type."""
    found = []
    for coder in ('encoder', 'decoder'):
        coder_cfg = cfg.get(coder)
        layer_cfg = coder_cfg.get('layer_cfg') if isinstance(coder_cfg, dict) else None
        if not isinstance(layer_cfg, dict):
            continue
        for key in _ATTENTION_CFG_KEYS:
            attn_cfg = layer_cfg.get(key)
            if isinstance(attn_cfg, dict) and 'type' in attn_cfg:
                found.append(f'{coder}.layer_cfg.{key}.type={attn_cfg["type"]!r}')
    return found


def check_attention_types(cfg) -> None:
    """Raise a ``TypeError`` naming the fix if ``cfg`` builds a DETR-family detector that cannot
    take the attention types its encoder/decoder config names (mmdet's plain classes)."""
    if not isinstance(cfg, dict) or not ('encoder' in cfg or 'decoder' in cfg):
        return
    detector = cfg.get('type')
    cls = MODELS.get(detector) if isinstance(detector, str) else detector
    if (not inspect.isclass(cls) or not issubclass(cls, DetectionTransformer)
            or issubclass(cls, RegistryAttentionMixin)):
        return
    typed = _typed_attention_keys(cfg)
    if not typed:
        return
    ours = _REGISTRY_ATTENTION_DETECTORS.get(cls)
    if ours is not None:
        fix = (f"use type='{ours.__name__}' (mmdet_detrx: {cls.__name__} with its attentions "
               'built from the registry; same parameter names, upstream checkpoints load)')
    else:
        fix = (f'define `class {cls.__name__}X(RegistryAttentionMixin, {cls.__name__})` '
               '(mmdet_detrx.models.detectors.detrx), register it and use it, as '
               + ', '.join(x.__name__ for x in _REGISTRY_ATTENTION_DETECTORS.values()) + ' do')
    raise TypeError(
        f"model type {detector if isinstance(detector, str) else cls.__name__!r} builds its "
        f"attentions by class and cannot take {', '.join(typed)}: {fix}. Registered attention "
        'types need a registry-attention detector.')


def _checking(build_func):
    if getattr(build_func, '_checks_attention_types', False):
        return build_func

    @functools.wraps(build_func)
    def build(cfg, *args, **kwargs):
        check_attention_types(cfg)
        return build_func(cfg, *args, **kwargs)

    build._checks_attention_types = True
    return build


def install_attention_type_check() -> None:
    """Run :func:`check_attention_types` before every model build: wrap the ``build_func`` of
    mmengine's and mmdet's ``MODELS`` (idempotent). Called by ``import mmdet_detrx``
    (docs/import.md): mmdet's own tools reach no code of ours before the build fails."""
    for registry in (MMENGINE_MODELS, MODELS):
        registry.build_func = _checking(registry.build_func)
