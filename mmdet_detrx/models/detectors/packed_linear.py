"""Linear layers on oneDNN with a prepacked weight, for CPU float32 inference.

``nn.Linear`` on CPU is MKL's ``addmm``: it first copies the broadcast bias into the output, then
runs the GEMM on the row-major weight. oneDNN's inner product
(``torch.ops.mkldnn._linear_pointwise``, which Inductor's CPU backend calls when it freezes
weights) adds the bias inside the GEMM and reads a weight reordered once into its own blocked
layout (``torch.ops.mkldnn._reorder_linear_weight``). In Deformable DETR R50 inference (fp32,
800x1333, 2 threads, AMD EPYC with AVX-512) ``addmm`` was ~1.2 s of ~2.5 s per image, plus
~0.23 s of its bias copies. Measured on that machine, 2 threads, x of shape (22223, in) (the
encoder's tokens at 800x1333):

===========  ============  ========================
in -> out    ``F.linear``  oneDNN, prepacked weight
===========  ============  ========================
256 -> 256   16.6 ms       14.3 ms
256 -> 1024  68.1 ms       53.6 ms
1024 -> 256  66.9 ms       53.5 ms
===========  ============  ========================

Outputs differ by float32 rounding only (another summation order: max 6.5e-5 on values of
magnitude ~16).

:func:`pack_linears` swaps the class of every ``nn.Linear`` and mmcv ``Linear`` (what mmcv's
``FFN``, mmdet's DETR heads, ``MLP`` and the deformable attentions' projections are) to
:class:`PackedLinear`, keeping its attributes: parameters are not renamed or re-registered, so
state dicts, strict loading, checkpoints and ``init_cfg`` (``layer='Linear'``) are unchanged.
Other subclasses are left alone: their forward may differ, and ``nn.MultiheadAttention``'s
``out_proj`` (``NonDynamicallyQuantizableLinear``) is never called, its weight is read by
``F.multi_head_attention_forward``. Weights used outside their layer's forward are not affected
(``MSDeformAttn`` applies ``sampling_offsets`` with ``F.linear`` for 2-d reference points).

A :class:`PackedLinear` decides at every call. It runs oneDNN, in inference and in training,
when all of these hold, otherwise
``nn.Linear``'s forward (returning a plain tensor, not a view, for a batched input: see
:meth:`PackedLinear._plain_forward`, which saves the training step a rebuild of each FFN
activation):

- the input is a plain, contiguous CPU ``torch.Tensor`` (no subclass, so no fake or functional
  tensor) ending in ``in_features``, and input, weight and bias are float32. oneDNN would copy a
  non-contiguous input first, where MKL reads it in place: for a transposed 22223 x 256 input
  oneDNN took 1.04x ``F.linear``'s time (1 thread);
- no CPU autocast (which casts ``F.linear``'s inputs to bfloat16);
- no forward-mode AD and no ``torch.func`` transform when autograd is needed: the training
  path (:class:`_OneDNNLinearFunction`, below) defines a backward only;
- not tracing or compiling (``torch.jit`` trace and ONNX export, ``torch.compile``,
  ``torch.export``): they see ``F.linear`` (Inductor can pack weights itself);
- at least :data:`MIN_ROWS` rows (``input.numel() // in_features``; 256: every encoder layer,
  and the decoders' 300 or 900 queries) and :data:`MIN_OUT_FEATURES` output features (8: not
  the box regressions' 4 outputs, 1.5x slower on oneDNN). Measured at 1 thread, in the
  comment above them;
- the oneDNN ops exist in this build of PyTorch.

In training the forward and the input's gradient run on oneDNN and the weight's and bias's
gradients are ``addmm``'s backward GEMM and sum, bitwise ``nn.Linear``'s for the same upstream
gradient (:class:`_OneDNNLinearFunction`). A Deformable DETR R50 train step (batch 1, 800x1333,
2 threads) took 7.77 s against 8.38 s with ``nn.Linear`` in training (alternating A/B).

The packed weight is a second copy of the weight in oneDNN's opaque layout (in training also a
third, of ``weight.t()``), cached on the module
(:func:`.param_cache.cached_derived`: repacked after ``load_state_dict``, an optimizer step,
``.to()``, and after ``train()`` / ``eval()``, which mmengine's loops call after ``EMAHook``
swaps weights through ``.data``; dropped from pickles and deep copies). If oneDNN raises, the layer warns once,
naming the op, and runs ``nn.Linear``'s forward from then on: the failed call's output was never
produced, so nothing wrong is returned.
"""
import functools
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import Linear as MMCVLinear
from torch.autograd import forward_ad

from .param_cache import DerivedCacheOwner, cached_derived

__all__ = ['PackedLinear', 'PackLinearMixin', 'pack_linears']


class _OneDNNLinearFunction(torch.autograd.Function):
    """``F.linear(input, layer.weight, layer.bias)`` for a :class:`PackedLinear` in training.

    Forward: oneDNN on the packed weight. Backward: the input's gradient ``grad @ weight`` is
    oneDNN's inner product too, on a second packed copy, of ``weight.t()`` (22223 rows,
    2 threads: 0.72-0.80x ``mm``'s time); the weight's and bias's gradients are the GEMM and sum
    that ``addmm``'s backward runs for a linear layer, in its layouts, so they are bitwise
    ``nn.Linear``'s for the same upstream gradient. Under ``create_graph`` the input's
    gradient is ``mm``, which autograd can differentiate.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, layer):
        ctx.save_for_backward(input, weight)
        ctx.layer = layer
        ctx.has_bias = bias is not None
        output = torch.ops.mkldnn._linear_pointwise(
            input.reshape(-1, input.shape[-1]), layer.packed_weight(), bias, 'none', [], '')
        # Not a view (oneDNN returns one for a batched input): see PackedLinear._plain_forward.
        return torch.ops.aten._unsafe_view(output, (*input.shape[:-1], output.shape[-1]))

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        grad_2d = grad_output.reshape(-1, grad_output.shape[-1])
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = None
            if not torch.is_grad_enabled() and grad_2d.dtype == torch.float32:
                grad_input = ctx.layer.onednn_call(lambda: torch.ops.mkldnn._linear_pointwise(
                    grad_2d.contiguous(), ctx.layer.packed_weight(transposed=True), None,
                    'none', [], ''))
            if grad_input is None:
                grad_input = grad_2d.mm(weight)
            grad_input = grad_input.view(input.shape)
        if ctx.needs_input_grad[1]:
            grad_weight = grad_2d.t().mm(input.reshape(-1, input.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(0)
        return grad_input, grad_weight, grad_bias, None


# Measured at 1 thread on the AMD EPYC (AVX-512), median over many calls, oneDNN / F.linear:
# 256 -> 256 rows 128 / 256 / 300 / 1024 / 22223: 0.96 / 0.93 / 0.94 / 0.91 / 0.84; 256 -> 1024
# and 1024 -> 256 0.90-0.93 from 128 rows, 0.80-0.83 at 22223; narrow outputs gain later and
# lose below: 256 -> 80 1.08 / 0.97 / 0.90 / 0.78 at 128 / 256 / 1024 / 22223 rows, 256 -> 8
# 1.31 at 128, 0.93 at 256, 1.00 at 22223, and 256 -> 4 (box regression) 1.5 at 256, 300 and
# 22223 rows. A weight packed for a row count (``_reorder_linear_weight``'s ``batch_size``) ran
# no faster than one packed without, so one packed weight serves every input.
#: Fewest rows (``input.numel() // in_features``) that take oneDNN.
MIN_ROWS = 256
#: Fewest output features that take oneDNN.
MIN_OUT_FEATURES = 8

_ONEDNN_LINEAR = (torch.backends.mkldnn.is_available()
                  and hasattr(torch.ops.mkldnn, '_linear_pointwise')
                  and hasattr(torch.ops.mkldnn, '_reorder_linear_weight'))


class PackedLinear(DerivedCacheOwner, nn.Linear):
    """``nn.Linear`` that runs CPU float32 inference on oneDNN (:func:`pack_linears`)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._uses_onednn(input):
            return self._plain_forward(input)
        output = self.onednn_call(
            lambda: _OneDNNLinearFunction.apply(input, self.weight, self.bias, self)
            if self._needs_autograd(input) else torch.ops.mkldnn._linear_pointwise(
                input, self.packed_weight(), self.bias, 'none', [], ''))
        return self._plain_forward(input) if output is None else output

    def onednn_call(self, call):
        """``call()``; if oneDNN raises, warn once, mark the layer so that it runs
        ``nn.Linear`` from then on, and return None (the caller computes it without oneDNN)."""
        try:
            return call()
        except RuntimeError as error:
            self.__dict__['_onednn_failed'] = True
            warnings.warn(f'torch.ops.mkldnn._linear_pointwise failed on a {self.in_features} -> '
                          f'{self.out_features} linear layer ({error}); it runs nn.Linear from '
                          'now on')
            return None

    def packed_weight(self, transposed: bool = False) -> torch.Tensor:
        """The weight (or ``weight.t()``, for the input's gradient) in oneDNN's layout, cached."""
        weight = self.weight.detach()
        if transposed:
            return cached_derived(self, '_packed_weight_t', (self.weight, ), lambda: (
                torch.ops.mkldnn._reorder_linear_weight(weight.t().contiguous())))
        return cached_derived(self, '_packed_weight', (self.weight, ), functools.partial(
            torch.ops.mkldnn._reorder_linear_weight, weight))

    def _needs_autograd(self, input: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (
            input.requires_grad or self.weight.requires_grad
            or (self.bias is not None and self.bias.requires_grad))

    def _plain_forward(self, input: torch.Tensor) -> torch.Tensor:
        """``nn.Linear``'s forward, whose output for a batched (>2-d) input is not a view.

        ``F.linear`` flattens such an input, runs ``addmm`` and returns a *view* of the result,
        and an in-place op on a view (mmcv's ``FFN`` applies ``ReLU(inplace=True)`` right after
        its first linear) makes autograd rebuild the whole base in the backward
        (``CopySlices``: a zero-filled tensor, a clone and a copy, each of 22223 x 1024 floats
        per encoder layer at 800x1333). The same ``addmm`` returned through ``_unsafe_view``, as
        ATen does where it knows the base is private, is a plain tensor to autograd: same values
        and gradients, bit for bit. A Deformable DETR R50 train step (batch 1, 800x1333, 2
        threads) took 8.8-9.3 s instead of 9.4-9.9 s with it. Traced and compiled graphs keep
        ``F.linear``.
        """
        if (input.dim() <= 2 or self.in_features == 0 or input.shape[-1] != self.in_features
                or not input.is_contiguous() or torch.jit.is_tracing()
                or torch.compiler.is_compiling()):
            return super().forward(input)
        output = F.linear(input.reshape(-1, self.in_features), self.weight, self.bias)
        return torch.ops.aten._unsafe_view(output, (*input.shape[:-1], self.out_features))

    def _uses_onednn(self, input: torch.Tensor) -> bool:
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return False
        weight, bias = self.weight, self.bias
        if (type(input) is not torch.Tensor or input.device.type != 'cpu'
                or weight.device.type != 'cpu' or not input.is_contiguous()
                or any(t.dtype != torch.float32 for t in (input, weight, bias) if t is not None)):
            return False
        # Forward-mode AD and torch.func transforms need formulas the autograd function below
        # does not define.
        if self._needs_autograd(input) and (forward_ad._current_level >= 0
                                            or torch._C._are_functorch_transforms_active()):
            return False
        # A wrong input width goes to nn.Linear, which raises its usual error.
        return not (self.in_features == 0 or input.dim() == 0
                    or input.shape[-1] != self.in_features or self.out_features < MIN_OUT_FEATURES
                    or input.numel() // self.in_features < MIN_ROWS
                    or torch.is_autocast_enabled('cpu') or not _ONEDNN_LINEAR
                    or self.__dict__.get('_onednn_failed'))


class PackedMMCVLinear(PackedLinear, MMCVLinear):
    """mmcv's ``Linear`` (``nn.Linear`` plus an empty-input case for PyTorch < 1.6)."""


_PACKED_CLASSES = {nn.Linear: PackedLinear, MMCVLinear: PackedMMCVLinear}


def pack_linears(module: nn.Module) -> int:
    """Make every ``nn.Linear`` and mmcv ``Linear`` in ``module`` (exactly those classes, no
    other subclass) a :class:`PackedLinear`; return how many layers are packed.

    Calling it again counts the same layers again. The state dict is unchanged.
    """
    num_layers = 0
    for layer in module.modules():
        packed_class = _PACKED_CLASSES.get(type(layer), type(layer))
        if packed_class not in _PACKED_CLASSES.values():
            continue
        layer.__class__ = packed_class
        layer.__dict__.pop('_packed_weight', None)
        layer.__dict__.pop('_packed_weight_t', None)
        layer.__dict__.pop('_onednn_failed', None)
        num_layers += 1
    return num_layers


class PackLinearMixin:
    """Put first in an mmdet detector's bases, so that it packs after the other mixins built
    their layers (``RegistryAttentionMixin`` swaps attentions in); adds ``pack_linear`` to its
    arguments.

    Args:
        pack_linear (bool): run the detector's linear layers (encoder, decoder, heads) on
            oneDNN with a prepacked weight in CPU float32 inference, and their forward and
            input gradient in CPU float32 training (:func:`pack_linears`); autocast, other
            devices and dtypes run ``nn.Linear`` as before. Same state dict, outputs equal up
            to float rounding. Default: True.
    """

    def __init__(self, *args, pack_linear: bool = True, **kwargs):
        if not isinstance(pack_linear, bool):
            raise TypeError(f'pack_linear must be a bool, got {pack_linear!r}')
        super().__init__(*args, **kwargs)
        self.pack_linear = pack_linear
        if pack_linear:
            pack_linears(self)
