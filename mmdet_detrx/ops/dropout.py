"""Dropout with a hashed mask: one pass on CPU, and nothing saved for the backward.

``torch.nn.functional.dropout`` on CPU fills a float mask with ``bernoulli_`` (a Mersenne-Twister
draw per element), divides it by ``1 - p``, multiplies, and keeps the mask for the backward.

:func:`dropout` runs the native op ``torch.ops.detrx.dropout(input, p, seed)``
(ops/cpu/dropout_kernel_impl.h, compiled and vectorised per instruction-set level like the
sampling kernels, ``MMDET_DETRX_CPU_CAPABILITY``): element ``i`` is multiplied by
``1 / (1 - p)`` when the ``i``-th 32-bit draw of SplitMix64's stream ``seed`` is at least
``p * 2**32``, else by 0 (so a NaN stays NaN, as with torch's mask multiply). A draw depends
only on ``(seed, i)``, so the mask is the same for any thread count and level, and the backward
is the same op on the gradient: only the seed is saved, not a mask as large as the input.

At the size of Deformable DETR's encoder FFN (22223 x 1024 float32 at 800x1333; 2 threads, AMD
EPYC, :func:`mmdet_detrx.utils.tune_malloc` on) ``F.dropout`` took 160-200 ms forward and
backward, this op 8-9 ms per pass at AVX2 / AVX-512 and 9-10 ms at the baseline level, about
one read and one write of the tensor.

The seed is drawn from torch's default CPU generator (or ``generator``), so ``torch.manual_seed``
makes runs repeat; the masks are not the ones ``F.dropout`` draws for the same seed (another
generator), but follow the same law: each element kept independently with probability
``1 - p``. The op computes in float32 (float64 for float64 inputs) and rounds once, so a
bfloat16 output is ``x / (1 - p)`` rounded, where ``F.dropout`` multiplies by ``1 / (1 - p)``
already rounded to bfloat16.

Where the native op does not apply, :func:`dropout` is ``F.dropout``: other devices, integer or
complex dtypes, ``inplace=True``, tracing and compiling (Inductor generates its own dropout),
tensor subclasses, and a build without the extension.
"""
import numbers
from typing import Optional

import torch
import torch.nn.functional as F

from ._library import has_native_kernel, native_available

__all__ = ['dropout']

_OP = 'detrx::dropout'
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _draw_seed(generator: Optional[torch.Generator]) -> int:
    """A 63-bit seed from torch's CPU generator (``random_`` of an int64: [0, 2**63))."""
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator))


def _uses_native(input: torch.Tensor, inplace: bool) -> bool:
    return (not inplace and type(input) is torch.Tensor and input.device.type == 'cpu'
            and input.dtype in _DTYPES and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling() and has_native_kernel(_OP, 'cpu'))


def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False,
            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``F.dropout(input, p, training, inplace)``, on the native op where it applies.

    Args:
        input (Tensor): any shape.
        p (float): probability of zeroing an element, in [0, 1].
        training (bool): apply dropout; otherwise return ``input`` itself.
        inplace (bool): ``F.dropout``'s in-place variant (always ``F.dropout``).
        generator (torch.Generator, optional): where the seed is drawn (CPU generator).

    Returns:
        Tensor: contiguous, of ``input``'s shape and dtype (``input`` itself when not training
        or when ``p == 0``, as ``F.dropout`` does).
    """
    if not isinstance(p, numbers.Real) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
        raise ValueError(f'dropout probability p must be in [0, 1], got {p!r}')
    if not _uses_native(input, inplace):
        return F.dropout(input, p, training, inplace)
    if not training or p == 0 or input.numel() == 0:
        return input
    return torch.ops.detrx.dropout(input, float(p), _draw_seed(generator))


# --- torch.library registrations of the native op -------------------------------------------

def _fake(input, p, seed):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, ctx.p, ctx.seed = inputs


def _backward(ctx, grad_output):
    # The op is linear in its input with the mask fixed by the seed: its backward is itself.
    return torch.ops.detrx.dropout(grad_output, ctx.p, ctx.seed), None, None


if native_available():
    torch.library.register_fake(_OP)(_fake)
    torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)
