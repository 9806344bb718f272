"""Multi-scale deformable attention core (Deformable DETR, Zhu et al., ICLR 2021,
arXiv:2010.04159, Eq. 3).

For every query ``q`` and head ``m`` the op sums, over levels ``l`` and points ``k``, the
attention weight ``A[q, m, l, k]`` times the value of level ``l`` bilinearly sampled at the
normalised location ``p[q, m, l, k] = (x, y)`` (``grid_sample`` semantics: bilinear, zero padding,
``align_corners=False``).

Shapes (``L`` levels of sizes ``H_l x W_l``, ``S = sum_l H_l * W_l`` value tokens)::

    value               (B, S, heads, C)
    spatial_shapes      (L, 2)   int64, rows (H_l, W_l)
    level_start_index   (L,)     int64, exclusive cumsum of H_l * W_l
    sampling_locations  (B, Q, heads, L, P, 2)   normalised (x, y)
    attention_weights   (B, Q, heads, L, P)
    output              (B, Q, heads * C)

``ms_deform_attn`` is a drop-in for mmcv's ``MultiScaleDeformableAttnFunction.apply``. It calls
the native op ``torch.ops.detrx.ms_deform_attn_forward`` (C++ on CPU, CUDA on GPU, built into
``mmdet_detrx._C``), which is registered with ``torch.library`` (fake kernel, autograd) so
``torch.compile(fullgraph=True)`` and ``torch.export`` see a single op. Mixed precision: a
float16 / bfloat16 value may come with float32 (or float64) locations and weights; under
autocast ``ms_deform_attn`` casts to exactly that (see ``_cast_for_autocast``, the one place
where inputs are cast). The native backward is
first-order only: double backward raises. ``ms_deform_attn_pytorch`` is the ``grid_sample``
reference: the test oracle, the fallback where no native kernel exists (with a one-time warning)
and a standard-ops path on request (``use_pytorch_ms_deform_attn()`` or the environment variable
``MMDET_DETRX_MSDA_PYTORCH=1``). ONNX export keeps the native op: its own lowering
(``ms_deform_attn_onnx.py``) writes it as GridSample ops or as TensorRT's plugin node.

Checks: on the native path the C++ op checks its inputs (ValueError / TypeError naming the
argument); the Python checks here run only where no native kernel does (the fake kernel and the
reference). The dtype policy of both is one table, ``ms_deform_attn_dtypes.def``.
"""
import contextlib
import os
import os.path as osp
import re
import warnings
from typing import Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F

from ._library import NATIVE_IMPORT_ERROR, has_native_kernel, native_available
from .ms_deform_attn_onnx import ms_deform_attn_onnx_lowering, register_onnx_lowering

__all__ = ['ms_deform_attn', 'ms_deform_attn_onnx_lowering', 'ms_deform_attn_pytorch',
           'use_pytorch_ms_deform_attn']

_FORWARD_OP = 'detrx::ms_deform_attn_forward'
_BACKWARD_OP = 'detrx::ms_deform_attn_backward'
_PYTORCH_ENV = 'MMDET_DETRX_MSDA_PYTORCH'
_force_pytorch = False
_warned_fallback = set()


@contextlib.contextmanager
def use_pytorch_ms_deform_attn(enabled: bool = True) -> Iterator[None]:
    """Make :func:`ms_deform_attn` use the ``grid_sample`` implementation inside the block.

    Meant for ONNX export and debugging: the PyTorch path is made of standard ops only.
    """
    global _force_pytorch
    previous, _force_pytorch = _force_pytorch, enabled
    try:
        yield
    finally:
        _force_pytorch = previous


def _pytorch_requested() -> bool:
    return _force_pytorch or os.environ.get(_PYTORCH_ENV, '0') == '1'


def _has_native_kernel(device_type: str) -> bool:
    return has_native_kernel(_FORWARD_OP, device_type)


def _warn_fallback(device_type: str) -> None:
    if device_type in _warned_fallback:
        return
    _warned_fallback.add(device_type)
    reason = (f'the extension mmdet_detrx._C is not available ({NATIVE_IMPORT_ERROR})'
              if not native_available() else f'it has no {device_type} kernel')
    warnings.warn(f'ms_deform_attn: using the slower PyTorch implementation on {device_type} '
                  f'because {reason}.')


def _is_tracing(spatial_shapes: torch.Tensor) -> bool:
    """True when tensor values cannot (or must not) be read: compile, export, jit, fake."""
    return (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or torch.onnx.is_in_onnx_export()
            or isinstance(spatial_shapes, torch._subclasses.FakeTensor)
            or spatial_shapes.device.type == 'meta')


def _autocast_dtype(value) -> Optional[torch.dtype]:
    """The lower-precision dtype of an active autocast region for value's device, else None."""
    if not isinstance(value, torch.Tensor):
        return None
    device_type = value.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


# The op's dtype policy, one table for C++ and Python: the supported (value, coordinate) pairs of
# ms_deform_attn_dtypes.def (c10 names). sampling_locations and attention_weights share the
# coordinate dtype, value's or a wider one. Output in value's dtype, each gradient in its input's.
_C10_DTYPES = {'Double': torch.float64, 'Float': torch.float32, 'Half': torch.float16,
               'BFloat16': torch.bfloat16}


def _read_dtype_table() -> Tuple[Tuple[torch.dtype, torch.dtype], ...]:
    with open(osp.join(osp.dirname(osp.abspath(__file__)), 'ms_deform_attn_dtypes.def')) as f:
        rows = re.findall(r'^DETRX_MSDA_DTYPE_PAIR\((\w+), *(\w+)\)', f.read(), re.MULTILINE)
    return tuple((_C10_DTYPES[value], _C10_DTYPES[coordinate]) for value, coordinate in rows)


DTYPE_PAIRS = _read_dtype_table()
_VALUE_DTYPES = tuple(dict.fromkeys(value for value, _ in DTYPE_PAIRS))
_LOW_PRECISION = (torch.float16, torch.bfloat16)  # autocast's dtypes


def _coordinate_dtypes(value_dtype: torch.dtype) -> Tuple[torch.dtype, ...]:
    """The dtypes that sampling_locations / attention_weights may have with this value dtype."""
    return tuple(coordinate for value, coordinate in DTYPE_PAIRS if value == value_dtype)


def _cast_for_autocast(value, sampling_locations, attention_weights):
    """Mixed precision under autocast, the only place where the op casts its inputs.

    A float32 value is cast to the autocast dtype (the gathers are memory-bound: half the bytes),
    float16 / bfloat16 locations and weights are cast up to float32 (a bfloat16 location is off
    by up to ~0.3 pixel on a 167-pixel-wide level, the widest level of an 800x1333 input);
    float64 inputs are left alone, as autocast leaves them. Outside autocast nothing is cast.
    """
    autocast_dtype = _autocast_dtype(value)
    if autocast_dtype is None:
        return value, sampling_locations, attention_weights
    if autocast_dtype in _LOW_PRECISION and value.dtype == torch.float32:
        value = value.to(autocast_dtype)
    sampling_locations, attention_weights = (
        t.float() if isinstance(t, torch.Tensor) and t.dtype in _LOW_PRECISION else t
        for t in (sampling_locations, attention_weights))
    return value, sampling_locations, attention_weights


def _check_level_table(shapes: Sequence[Sequence[int]], starts: Optional[Sequence[int]],
                       num_value: int) -> None:
    """Validates a level table given as Python ints (exact: no overflow at any size).

    The same rules as the native op's ``msda::check_levels``: every H_l, W_l > 0,
    ``sum_l H_l * W_l == num_value`` and, when given, ``starts`` == the exclusive cumsum.
    """
    total = 0
    for level, (height, width) in enumerate(shapes):
        if height <= 0 or width <= 0:
            raise ValueError(f'ms_deform_attn: spatial_shapes must be positive, got '
                             f'({height}, {width}) at level {level}')
        total += height * width
    if total != num_value:
        raise ValueError(f'ms_deform_attn: sum of H * W over spatial_shapes ({total}) must equal '
                         f'value.shape[1] (S={num_value})')
    if starts is None:
        return
    start = 0
    for level, ((height, width), actual) in enumerate(zip(shapes, starts)):
        if actual != start:
            raise ValueError(f'ms_deform_attn: level_start_index[{level}] must be {start} '
                             f'(exclusive cumsum of H * W), got {actual}')
        start += height * width


def _check_metadata(value, spatial_shapes, level_start_index, sampling_locations,
                    attention_weights, im2col_step, grad_output=None) -> None:
    """Types, ranks, sizes, devices and dtypes; reads no tensor values. Raises TypeError /
    ValueError naming the argument. The Python twin of the C++ check, for the paths where no
    native kernel runs: the fake kernel and the reference."""
    _check_argument_types(value, spatial_shapes, level_start_index, sampling_locations,
                          attention_weights, im2col_step)
    names = ('value', 'spatial_shapes', 'level_start_index', 'sampling_locations',
             'attention_weights')
    tensors = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if im2col_step <= 0:
        raise ValueError(f'ms_deform_attn: im2col_step must be positive, got {im2col_step}')

    expected_ranks = (('value', 4, '(B, S, heads, C)'), ('spatial_shapes', 2, '(L, 2)'),
                      ('level_start_index', 1, '(L,)'),
                      ('sampling_locations', 6, '(B, Q, heads, L, P, 2)'),
                      ('attention_weights', 5, '(B, Q, heads, L, P)'))
    for tensor, (name, rank, shape) in zip(tensors, expected_ranks):
        if tensor.dim() != rank:
            raise ValueError(f'ms_deform_attn: {name} must have shape {shape}, '
                             f'got {tuple(tensor.shape)}')

    for name, tensor in zip(names[1:], tensors[1:]):
        if tensor.device != value.device:
            raise ValueError(f"ms_deform_attn: {name} must be on value's device {value.device}, "
                             f'got {tensor.device}')
    if value.dtype not in _VALUE_DTYPES:
        raise TypeError('ms_deform_attn: value must be float16, bfloat16, float32 or float64, '
                        f'got {value.dtype}')
    coordinate_dtypes = _coordinate_dtypes(value.dtype)
    if sampling_locations.dtype not in coordinate_dtypes:
        wider = ' / '.join(str(d) for d in coordinate_dtypes if d != value.dtype)
        mixed = (f' or {wider}' if wider else '') + (' (mixed precision)'
                                                      if value.dtype in _LOW_PRECISION else '')
        raise TypeError(f"ms_deform_attn: sampling_locations must have value's dtype "
                        f'{value.dtype}{mixed}, got {sampling_locations.dtype}')
    if attention_weights.dtype != sampling_locations.dtype:
        raise TypeError("ms_deform_attn: attention_weights must have sampling_locations' dtype "
                        f'{sampling_locations.dtype}, got {attention_weights.dtype}')
    for name, tensor in (('spatial_shapes', spatial_shapes),
                         ('level_start_index', level_start_index)):
        if tensor.dtype != torch.int64:
            raise TypeError(f'ms_deform_attn: {name} must be int64, got {tensor.dtype}')

    B, S, heads, C = value.shape
    L = spatial_shapes.shape[0]
    if spatial_shapes.shape[1] != 2 or L == 0:
        raise ValueError('ms_deform_attn: spatial_shapes must have shape (L, 2) with L >= 1, '
                         f'got {tuple(spatial_shapes.shape)}')
    if level_start_index.shape[0] != L:
        raise ValueError(f'ms_deform_attn: level_start_index must have {L} entries (one per '
                         f'level of spatial_shapes), got {level_start_index.shape[0]}')
    locations_shape = tuple(sampling_locations.shape)
    if (locations_shape[0] != B or locations_shape[2] != heads or locations_shape[3] != L
            or locations_shape[5] != 2):
        raise ValueError(f'ms_deform_attn: sampling_locations must have shape (B={B}, Q, '
                         f'heads={heads}, L={L}, P, 2), got {locations_shape}')
    if tuple(attention_weights.shape) != locations_shape[:5]:
        raise ValueError(f'ms_deform_attn: attention_weights must have shape '
                         f'{locations_shape[:5]} (B, Q, heads, L, P), '
                         f'got {tuple(attention_weights.shape)}')
    if grad_output is None:
        return
    if not isinstance(grad_output, torch.Tensor):
        raise TypeError('ms_deform_attn: grad_output must be a torch.Tensor, '
                        f'got {type(grad_output).__name__}')
    if grad_output.device != value.device:
        raise ValueError(f"ms_deform_attn: grad_output must be on value's device {value.device}, "
                         f'got {grad_output.device}')
    if grad_output.dtype != value.dtype:
        raise TypeError(f"ms_deform_attn: grad_output must have value's dtype {value.dtype}, "
                        f'got {grad_output.dtype}')
    if tuple(grad_output.shape) != (B, locations_shape[1], heads * C):
        raise ValueError(f'ms_deform_attn: grad_output must have shape (B={B}, '
                         f'Q={locations_shape[1]}, heads*C={heads * C}), '
                         f'got {tuple(grad_output.shape)}')


def _check_argument_types(value, spatial_shapes, level_start_index, sampling_locations,
                          attention_weights, im2col_step) -> None:
    """What only Python can see: arguments that are not tensors, a non-int im2col_step."""
    names = ('value', 'spatial_shapes', 'level_start_index', 'sampling_locations',
             'attention_weights')
    tensors = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    for name, tensor in zip(names, tensors):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f'ms_deform_attn: {name} must be a torch.Tensor, '
                            f'got {type(tensor).__name__}')
    if isinstance(im2col_step, bool) or not isinstance(im2col_step, int):
        raise TypeError(f'ms_deform_attn: im2col_step must be an int, got {im2col_step!r}')


def _refuse_forward_ad(*tensors: torch.Tensor) -> None:
    """Forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``) has no formula in the
    native op: torch would drop the tangents and return zeros. Refuse instead."""
    if getattr(forward_ad, '_current_level', 0) < 0 or torch.compiler.is_compiling():
        return  # no dual level is open (the usual case): nothing to inspect
    if any(forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise NotImplementedError(
            'ms_deform_attn: forward-mode AD (torch.func.jvp / torch.autograd.forward_ad) is not '
            'implemented (the native op would return zero tangents, and the grid_sample '
            'reference has no forward-mode formula either); use reverse mode (backward, '
            'torch.func.vjp / jacrev)')


def ms_deform_attn(value: torch.Tensor,
                   spatial_shapes: torch.Tensor,
                   level_start_index: torch.Tensor,
                   sampling_locations: torch.Tensor,
                   attention_weights: torch.Tensor,
                   im2col_step: int = 64) -> torch.Tensor:
    """Multi-scale deformable attention, differentiable in value, sampling_locations and
    attention_weights. Returns ``(B, Q, heads * C)`` in value's dtype.

    ``im2col_step`` is kept for mmcv's signature: validated (> 0), ignored by every kernel (CPU
    and CUDA process the whole batch at once); any batch size works.
    Dtypes: sampling_locations and attention_weights share one dtype, value's or (mixed
    precision) float32 / float64 with a float16 / bfloat16 value; the arithmetic is float32
    (float64 for float64 locations). Under autocast a float32 value is cast to the autocast dtype
    and float16 / bfloat16 locations and weights to float32: the output has the autocast dtype
    while the sampling runs at float32 locations.
    Bad input raises ValueError / TypeError naming the argument (from the native op's own check
    on the native path).
    """
    value, sampling_locations, attention_weights = _cast_for_autocast(
        value, sampling_locations, attention_weights)
    _check_argument_types(value, spatial_shapes, level_start_index, sampling_locations,
                          attention_weights, im2col_step)
    device_type = value.device.type
    if not _pytorch_requested() and _has_native_kernel(device_type):
        # The op checks everything itself (C++, or the fake kernel on meta / fake tensors).
        _refuse_forward_ad(value, sampling_locations, attention_weights)
        return torch.ops.detrx.ms_deform_attn_forward(value, spatial_shapes, level_start_index,
                                                      sampling_locations, attention_weights,
                                                      im2col_step)
    if not _pytorch_requested():
        _warn_fallback(device_type)
    _check_metadata(value, spatial_shapes, level_start_index, sampling_locations,
                    attention_weights, im2col_step)
    if spatial_shapes.device.type == 'cpu' and not _is_tracing(spatial_shapes):
        # One read of the index tensors: the reference runs on the validated snapshot. (On a
        # GPU the read would cost a device sync; the reference reads the shapes anyway.)
        shapes = spatial_shapes.tolist()
        _check_level_table(shapes, level_start_index.tolist(), value.shape[1])
        spatial_shapes = shapes
    return ms_deform_attn_pytorch(value, spatial_shapes, sampling_locations, attention_weights)


def ms_deform_attn_pytorch(value: torch.Tensor,
                           spatial_shapes: Union[torch.Tensor, Sequence[Sequence[int]]],
                           sampling_locations: torch.Tensor,
                           attention_weights: torch.Tensor) -> torch.Tensor:
    """Reference implementation with ``F.grid_sample`` (standard ops only, ONNX-exportable).

    ``spatial_shapes`` may also be a list of ``(H, W)`` pairs. Shapes as in the module docstring.
    Dtypes as for :func:`ms_deform_attn`: with mixed precision (float32 / float64 locations and
    weights, float16 / bfloat16 value) the sampling runs in the locations' dtype and the output
    is rounded to value's dtype.
    """
    B, S, heads, C = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = spatial_shapes.tolist()
    shapes = [(int(H), int(W)) for H, W in spatial_shapes]
    if not (torch.compiler.is_compiling() or torch.jit.is_tracing()):  # eager: S is an int
        _check_level_table(shapes, None, S)  # Python ints: exact for any H, W
    output_dtype = value.dtype
    if sampling_locations.dtype != value.dtype:  # mixed precision: sample at the locations'
        value = value.to(sampling_locations.dtype)
    value_per_level = value.split([H * W for H, W in shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample expects [-1, 1]
    sampled = []
    for level, (H, W) in enumerate(shapes):
        # (B, H*W, heads, C) -> (B*heads, C, H, W)
        value_l = value_per_level[level].flatten(2).transpose(1, 2).reshape(B * heads, C, H, W)
        # (B, Q, heads, P, 2) -> (B*heads, Q, P, 2)
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # (B*heads, C, Q, P)
        sampled.append(F.grid_sample(value_l, grid_l, mode='bilinear', padding_mode='zeros',
                                     align_corners=False))
    # (B, Q, heads, L, P) -> (B*heads, 1, Q, L*P)
    weights = attention_weights.transpose(1, 2).reshape(B * heads, 1, Q, L * P)
    # (B*heads, C, Q, L*P) -> (B*heads, C, Q)
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    # (B*heads, C, Q) -> (B, Q, heads*C)
    output = output.view(B, heads * C, Q).transpose(1, 2).contiguous()
    return output if output.dtype == output_dtype else output.to(output_dtype)


# --- torch.library registrations of the native op -------------------------------------------

def _check_fake_inputs(*args, grad_output=None) -> None:
    """The native op's metadata checks for fake / meta tensors (the fake kernel also runs when
    only some inputs are on the meta device: the meta dispatch key wins, which must fail instead
    of returning uninitialised memory). Same errors as the C++ check: ValueError / TypeError."""
    _check_metadata(*args, grad_output=grad_output)


def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations,
                  attention_weights, im2col_step):
    _check_fake_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                       attention_weights, im2col_step)
    B, _, heads, C = value.shape
    return value.new_empty((B, sampling_locations.shape[1], heads * C))


def _backward_fake(value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights, grad_output, im2col_step):
    _check_fake_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                       attention_weights, im2col_step, grad_output=grad_output)
    return (value.new_empty(value.shape), sampling_locations.new_empty(sampling_locations.shape),
            attention_weights.new_empty(attention_weights.shape))


def _setup_context(ctx, inputs, output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, step = inputs
    ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations,
                          attention_weights)
    ctx.im2col_step = step


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = (
        ctx.saved_tensors)
    grad_value, grad_sampling_locations, grad_attention_weights = (
        torch.ops.detrx.ms_deform_attn_backward(value, spatial_shapes, level_start_index,
                                                sampling_locations, attention_weights,
                                                grad_output.contiguous(), ctx.im2col_step))
    return grad_value, None, None, grad_sampling_locations, grad_attention_weights, None


def _double_backward(ctx, *grads):
    raise RuntimeError('ms_deform_attn: double backward is not supported by the native op; '
                       'use ms_deform_attn_pytorch (or use_pytorch_ms_deform_attn()) for '
                       'higher-order gradients')


def _backward_setup_context(ctx, inputs, output):
    pass


if native_available():
    torch.library.register_fake(_FORWARD_OP)(_forward_fake)
    torch.library.register_fake(_BACKWARD_OP)(_backward_fake)
    torch.library.register_autograd(_FORWARD_OP, _backward, setup_context=_setup_context)
    torch.library.register_autograd(_BACKWARD_OP, _double_backward,
                                    setup_context=_backward_setup_context)
    # No register_autocast: under autocast the raw ops take their inputs as given (autocast
    # falls through), and ms_deform_attn applies the mixed-precision casts (_cast_for_autocast).
    # ONNX: the op carries its own lowering (GridSample ops or TensorRT's plugin node).
    register_onnx_lowering()
