"""Fold a frozen (eval-mode) BatchNorm into the convolution before it.

mmdet's DETR-family configs freeze the ResNet's BatchNorms (``norm_cfg=dict(type='BN',
requires_grad=False), norm_eval=True``): in inference, and in training too, every BN is in eval
mode, i.e. the per-channel affine map ``y = (x - mean) * s + beta`` with
``s = gamma / sqrt(var + eps)``. Applied to a convolution's output, that is the same convolution
with ``W' = W * s`` (per output channel) and ``b' = (b - mean) * s + beta``, so the BN's separate
pass over a large activation can go. In Deformable DETR R50 on CPU (800x1333, 2 threads) the
53 BN passes took ~190 ms of ~3 s per image (``aten::native_batch_norm`` in a torch.profiler
trace).

:func:`fold_frozen_batch_norms` finds the conv -> BN pairs of mmdet's ResNet family (the stem,
``BasicBlock`` / ``Bottleneck``, and ``nn.Sequential`` downsamples and deep stems) and swaps the
classes of both modules (:class:`FoldedBNConv2d` and a subclass of the BN's own class), keeping
their attributes. Nothing is registered or renamed: state dicts, strict loading and checkpoints
are unchanged. The decision is made at every call from the BN's mode:

- BN in eval mode: the convolution computes the folded conv and marks its output; the BN
  returns a marked input unchanged. From live parameters when autograd needs them (training
  with ``norm_eval=True``: gradients reach the conv weight and any trainable gamma / beta),
  otherwise from a cache keyed on the version, storage, device and dtype of every tensor
  involved (a ``load_state_dict``, an optimizer step, ``.to()`` or ``.half()`` refreshes it,
  and so does ``train()`` / ``eval()``: see :mod:`.param_cache` for ``.data`` writes).
  The cache costs a second copy of the folded weights (90 MiB for R50 in float32); computing
  them at every call instead took 17 ms (R50, 1 thread).
- BN in training mode: both run unfolded, exactly as before.

The fold is computed in (at least) float32 and cast to the weight's dtype; under autocast the
folded weight goes through ``F.conv2d``'s usual cast. A convolution with forward hooks runs
unfolded (its hooks see the raw convolution output), as does a BN with forward pre-hooks. Under
``torch.compile`` nothing folds (the compiler fuses on its own). The BN is looked up in its
parent at every call, so a BN replaced after folding (mmengine's ``convert_sync_batchnorm`` /
``revert_sync_batchnorm``) just runs unfolded.
"""
import functools
from typing import Iterator, Optional, Tuple

import torch
import torch.nn as nn
from mmdet.models.backbones.resnet import BasicBlock, Bottleneck, ResNet
from mmengine.utils.dl_utils.parrots_wrapper import SyncBatchNorm as MMEngineSyncBatchNorm
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from .param_cache import DerivedCacheOwner, cached_derived

__all__ = ['FoldedBNConv2d', 'FoldFrozenBNMixin', 'fold_frozen_batch_norms']

# Set on a folded convolution's output: the pair's token, which the BN checks before skipping.
_FOLDED_MARK = '_detrx_folded_bn'


def _folded_weight_and_bias(weight: torch.Tensor, bias: Optional[torch.Tensor],
                            bn: _BatchNorm) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(W * s, (b - mean) * s + beta)``, ``s = gamma / sqrt(var + eps)``: the convolution
    that computes ``bn(conv(x))`` for an eval-mode ``bn``, in ``weight``'s dtype."""
    dtype = weight.dtype
    compute = torch.promote_types(dtype, torch.float32)
    scale = torch.rsqrt(bn.running_var.to(compute) + bn.eps)  # (C_out, )
    if bn.weight is not None:
        scale = scale * bn.weight.to(compute)
    mean = bn.running_mean.to(compute)
    shift = -mean if bias is None else bias.to(compute) - mean
    folded_bias = shift * scale
    if bn.bias is not None:
        folded_bias = folded_bias + bn.bias.to(compute)
    folded_weight = weight.to(compute) * scale.reshape(-1, 1, 1, 1)  # (C_out, C_in / g, kh, kw)
    return folded_weight.to(dtype), folded_bias.to(dtype)


class FoldedBNConv2d(DerivedCacheOwner, nn.Conv2d, _ConvNd):
    """``nn.Conv2d`` that applies the eval-mode BN after it (:func:`fold_frozen_batch_norms`).

    ``_ConvNd`` is repeated in the bases because mmengine's ``init_cfg`` matches ``layer=``
    against a module's class name and its direct bases' names: ``'Conv2d'`` and ``'_ConvNd'``
    keep matching.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        bn = self._frozen_bn()
        if bn is None:
            return super().forward(input)
        output = self._conv_forward(input, *self._folded_parameters(bn))
        setattr(output, _FOLDED_MARK, self.__dict__['_bn_link'][2])
        return output

    def _frozen_bn(self) -> Optional[_BatchNorm]:
        """The paired BN if this call folds it, else ``None``."""
        if torch.compiler.is_compiling():
            return None
        link = self.__dict__.get('_bn_link')
        if link is None or self._forward_hooks:
            return None
        parent, bn_name, token = link
        bn = parent._modules.get(bn_name)
        if (not isinstance(bn, _SkipsFoldedInput) or bn.__dict__.get('_fold_token') is not token
                or bn.training or bn._forward_pre_hooks or bn.running_mean is None
                or bn.running_var is None):
            return None
        return bn

    def _folded_parameters(self, bn: _BatchNorm) -> Tuple[torch.Tensor, torch.Tensor]:
        sources = (self.weight, self.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        if torch.jit.is_tracing() or (torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in sources)):
            return _folded_weight_and_bias(self.weight, self.bias, bn)
        return cached_derived(
            self, '_folded_cache', sources,
            functools.partial(_folded_weight_and_bias, self.weight, self.bias, bn),
            extra=(bn.eps, ))


class _SkipsFoldedInput:
    """Forward of a BN whose convolution already applied it (input marked with the pair's
    token); any other input goes through the BN's own forward."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return super().forward(input)
        token = self.__dict__.get('_fold_token')
        if token is not None and getattr(input, _FOLDED_MARK, None) is token:
            delattr(input, _FOLDED_MARK)  # a second call on the same tensor normalises
            return input
        return super().forward(input)


# Each BN class whose eval forward is the plain affine map, and its folding subclass. The
# original's bases are repeated for mmengine's ``init_cfg`` name matching (``'_BatchNorm'``).
class FoldedBatchNorm2d(_SkipsFoldedInput, nn.BatchNorm2d, _BatchNorm):
    pass


class FoldedSyncBatchNorm(_SkipsFoldedInput, nn.SyncBatchNorm, _BatchNorm):
    pass


class FoldedMMEngineSyncBatchNorm(_SkipsFoldedInput, MMEngineSyncBatchNorm, nn.SyncBatchNorm):
    pass  # mmcv's 'SyncBN'


_FOLDED_BN_CLASSES = {
    nn.BatchNorm2d: FoldedBatchNorm2d,
    nn.SyncBatchNorm: FoldedSyncBatchNorm,
    MMEngineSyncBatchNorm: FoldedMMEngineSyncBatchNorm,
}
_FOLDABLE_BN_CLASSES = tuple(_FOLDED_BN_CLASSES) + tuple(_FOLDED_BN_CLASSES.values())


def _conv_bn_names(parent: nn.Module) -> Iterator[Tuple[str, str]]:
    """``(conv name, BN name)`` of the children of ``parent`` whose forward feeds the conv's
    output straight into the BN."""
    if isinstance(parent, ResNet):
        if not parent.deep_stem:  # the deep stem is an nn.Sequential, found below
            yield 'conv1', parent.norm1_name
    elif isinstance(parent, (BasicBlock, Bottleneck)):
        num_convs = 3 if isinstance(parent, Bottleneck) else 2
        for index in range(1, num_convs + 1):
            yield f'conv{index}', getattr(parent, f'norm{index}_name')
    elif isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward:
        names = list(parent._modules)
        yield from zip(names[:-1], names[1:])


def fold_frozen_batch_norms(module: nn.Module) -> int:
    """Make every conv -> BN pair in ``module`` fold the BN into the conv whenever the BN is in
    eval mode; return the number of pairs.

    A pair is a plain ``nn.Conv2d`` (not DCN, not BoTNet's attention, not another subclass)
    followed by an ``nn.BatchNorm2d`` / ``nn.SyncBatchNorm`` (mmcv's ``'BN'`` / ``'SyncBN'``)
    that tracks running statistics, in mmdet's ``ResNet`` stem, its ``BasicBlock`` /
    ``Bottleneck`` (and subclasses that keep their ``conv{i}`` -> ``norm{i}`` order) and in
    ``nn.Sequential`` containers (downsamples, deep stems). Calling it again re-links the same
    pairs. The state dict is unchanged.
    """
    num_pairs = 0
    for parent in module.modules():
        for conv_name, bn_name in _conv_bn_names(parent):
            conv, bn = parent._modules.get(conv_name), parent._modules.get(bn_name)
            if (type(conv) not in (nn.Conv2d, FoldedBNConv2d)
                    or type(bn) not in _FOLDABLE_BN_CLASSES or not bn.track_running_stats
                    or bn.num_features != conv.out_channels):
                continue
            conv.__class__ = FoldedBNConv2d
            bn.__class__ = _FOLDED_BN_CLASSES.get(type(bn), type(bn))
            # Held in __dict__, not registered: named_modules() and the state dict stay as
            # they were. The token, shared by the two, is what a folded output is marked with.
            token = object()
            conv.__dict__['_bn_link'] = (parent, bn_name, token)
            conv.__dict__.pop('_folded_cache', None)
            bn.__dict__['_fold_token'] = token
            num_pairs += 1
    return num_pairs


class FoldFrozenBNMixin:
    """Put before an mmdet detector in the bases; adds ``fold_frozen_bn`` to its arguments.

    Args:
        fold_frozen_bn (bool): fold each backbone BatchNorm into the convolution before it
            while the BN is in eval mode (:func:`fold_frozen_batch_norms`): always in inference,
            and in training with ``norm_eval=True`` (mmdet's DETR configs). Same state dict,
            outputs equal up to float rounding. Default: True.
    """

    def __init__(self, *args, fold_frozen_bn: bool = True, **kwargs):
        if not isinstance(fold_frozen_bn, bool):
            raise TypeError(f'fold_frozen_bn must be a bool, got {fold_frozen_bn!r}')
        super().__init__(*args, **kwargs)
        self.fold_frozen_bn = fold_frozen_bn
        if fold_frozen_bn:
            fold_frozen_batch_norms(self.backbone)
