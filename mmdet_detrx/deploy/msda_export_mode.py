"""Route a model's multi-scale deformable attentions through the plugin op during export.

Inside ``msda_plugin_export(model)``, every ``MultiScaleDeformableAttention`` of ``model``
computes its core with ``torch.ops.detrx_deploy.ms_deform_attn_plugin`` (:mod:`.msda_plugin`),
which the ONNX exporter writes as one TensorRT plugin node. mmcv's modules are computed as our
:class:`MSDeformAttn` for the duration (same parameters, same call; ours separates the sampling
points from the core), and ``MSDeformAttn``'s core call is redirected.
"""
import contextlib
from typing import Iterator, List

import torch
from mmcv.ops import MultiScaleDeformableAttention
from torch import nn

from mmdet_detrx.models.layers import MSDeformAttn
from mmdet_detrx.models.layers import multi_scale_deform_attn as _msda_layer
from . import msda_plugin  # noqa: F401  (defines torch.ops.detrx_deploy.ms_deform_attn_plugin)

__all__ = ['msda_modules', 'msda_plugin_export']


def _plugin_core(value, spatial_shapes, level_start_index, sampling_locations,
                 attention_weights, im2col_step=64):
    # Same call as mmdet_detrx.ops.ms_deform_attn; im2col_step: validated there, no kernel uses it.
    return torch.ops.detrx_deploy.ms_deform_attn_plugin(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def msda_modules(model: nn.Module) -> List[nn.Module]:
    """Every multi-scale deformable attention of ``model`` (ours or mmcv's)."""
    return [m for m in model.modules() if isinstance(m, MultiScaleDeformableAttention)]


@contextlib.contextmanager
def msda_plugin_export(model: nn.Module) -> Iterator[int]:
    """Route every multi-scale deformable attention of ``model`` through the plugin op.

    Yields the number of such modules; everything is restored on exit, also after an
    exception.
    """
    modules = msda_modules(model)
    swapped = [m for m in modules if not isinstance(m, MSDeformAttn)]
    previous_classes = [type(m) for m in swapped]
    previous_core = _msda_layer.ms_deform_attn
    try:
        for module in swapped:
            module.__class__ = MSDeformAttn
        _msda_layer.ms_deform_attn = _plugin_core
        yield len(modules)
    finally:
        _msda_layer.ms_deform_attn = previous_core
        for module, cls in zip(swapped, previous_classes):
            module.__class__ = cls
