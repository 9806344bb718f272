"""The native library of ``mmdet_detrx.ops``: loads ``mmdet_detrx._C`` once for every op.

Importing the extension runs its static initialisers, which declare the ``detrx`` operator
library (ops/detrx.cpp) and register each op's schemas and CPU / CUDA kernels with the
dispatcher; Python then calls them as ``torch.ops.detrx.<op>``. Each op module
(``ms_deform_attn.py``, ...) adds its ``torch.library`` registrations (fake kernel, autograd,
ONNX lowering) on top, and ``mmdet_detrx/ops/__init__.py`` imports each op module (one line per
op).
"""
import torch

__all__ = ['NATIVE_IMPORT_ERROR', 'has_native_kernel', 'native_available']

try:
    from .. import _C  # noqa: F401  (loading the library registers torch.ops.detrx.*)
    NATIVE_IMPORT_ERROR = None
except ImportError as error:  # extension not built (e.g. MMDET_DETRX_NO_EXT=1)
    _C = None
    NATIVE_IMPORT_ERROR = error


def native_available() -> bool:
    """Whether the native extension ``mmdet_detrx._C`` loaded (and registered its ops)."""
    return _C is not None


@torch.compiler.assume_constant_result
def has_native_kernel(op: str, device_type: str) -> bool:
    """Whether ``op`` (e.g. ``'detrx::ms_deform_attn_forward'``) has a kernel for the device
    type (``'meta'``: the fake kernel)."""
    if _C is None:
        return False
    dispatch_key = 'Meta' if device_type == 'meta' else device_type.upper()
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key)
    except RuntimeError:  # a device type whose dispatch key is not its upper-cased name
        return False
