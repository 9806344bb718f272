"""The multi-scale deformable attentions of a model, computed by our op for export.

Export needs nothing from these modules beyond running the op: ``detrx::ms_deform_attn_forward``
carries its own ONNX lowering (:mod:`mmdet_detrx.ops.ms_deform_attn_onnx`). mmcv's own
``MultiScaleDeformableAttention`` does not call the op (on the CPU it runs its PyTorch code), so
:func:`with_native_msda` returns a copy of such a model in which each of mmcv's modules is an
:class:`MSDeformAttn` holding the very same parameters (ours adds no state to mmcv's class, only
its forward differs); the caller's model is never modified.
"""
import copy
from typing import List

from mmcv.ops import MultiScaleDeformableAttention
from torch import nn

from mmdet_detrx.models.layers import MSDeformAttn

__all__ = ['msda_modules', 'with_native_msda']


def msda_modules(model: nn.Module) -> List[nn.Module]:
    """Every multi-scale deformable attention of ``model`` (ours or mmcv's)."""
    return [m for m in model.modules() if isinstance(m, MultiScaleDeformableAttention)]


def with_native_msda(model: nn.Module) -> nn.Module:
    """``model`` if all its deformable attentions are :class:`MSDeformAttn`, else a deep copy in
    which mmcv's are replaced by :class:`MSDeformAttn` modules with the same parameters."""
    names = [name for name, m in model.named_modules()
             if isinstance(m, MultiScaleDeformableAttention) and not isinstance(m, MSDeformAttn)]
    if not names:
        return model
    model = copy.deepcopy(model)
    for name in names:
        module = model.get_submodule(name)
        native = MSDeformAttn.__new__(MSDeformAttn)
        native.__dict__.update(module.__dict__)  # parameters, buffers, settings: all of it
        model.set_submodule(name, native)
    return model
