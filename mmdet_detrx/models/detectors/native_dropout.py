"""The detectors' ``nn.Dropout`` layers on the native hashed-mask dropout in CPU training.

A Deformable DETR R50 train step (batch 1, 800x1333, 2 threads, AMD EPYC) spent ~1.3 s of ~9 s
in ``bernoulli_``, the mask fill of torch's CPU dropout, plus its mask divide and multiplies:
the 48 dropouts of its encoder and decoder see 205 M elements per step. :func:`use_native_dropout`
swaps the class of every ``nn.Dropout`` (exactly that class) to :class:`NativeDropout`, which in
training on CPU calls :func:`mmdet_detrx.ops.dropout`: one pass, the mask a hash of a seed drawn
from torch's generator, nothing saved for the backward but the seed (see that function for the
law and what differs from ``F.dropout``). Dropout has no parameters, so the state dict is
unchanged; in eval mode it is the identity, as before.
"""
import torch
import torch.nn as nn

from mmdet_detrx.ops import dropout

__all__ = ['NativeDropout', 'NativeDropoutMixin', 'use_native_dropout']


class NativeDropout(nn.Dropout):
    """``nn.Dropout`` whose training-mode CPU calls run :func:`mmdet_detrx.ops.dropout`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return dropout(input, self.p, self.training, self.inplace)


def use_native_dropout(module: nn.Module) -> int:
    """Make every ``nn.Dropout`` in ``module`` (no subclass) a :class:`NativeDropout`; return
    how many layers use it (those already swapped included)."""
    num_layers = 0
    for layer in module.modules():
        if type(layer) is nn.Dropout:
            layer.__class__ = NativeDropout
        num_layers += type(layer) is NativeDropout
    return num_layers


class NativeDropoutMixin:
    """Put first in an mmdet detector's bases (after the attention swaps, which build new
    dropouts); adds ``native_dropout`` to its arguments.

    Args:
        native_dropout (bool): run the detector's ``nn.Dropout`` layers on the native
            hashed-mask dropout in CPU training (:func:`use_native_dropout`); other devices and
            evaluation are unchanged. Same law, other random masks than ``F.dropout`` for a
            given seed. Default: True.
    """

    def __init__(self, *args, native_dropout: bool = True, **kwargs):
        if not isinstance(native_dropout, bool):
            raise TypeError(f'native_dropout must be a bool, got {native_dropout!r}')
        super().__init__(*args, **kwargs)
        self.native_dropout = native_dropout
        if native_dropout:
            use_native_dropout(self)
