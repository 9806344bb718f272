"""Mixed precision on CPU: ``tools/train.py --amp`` without a GPU.

mmengine's ``AmpOptimWrapper`` asserts a GPU/NPU/MLU/MUSA device. On CPU, autocast in bfloat16 is
supported and, with bf16's fp32-sized exponent, needs no loss scaling, so this wrapper only adds
the autocast context around the forward.
"""
from contextlib import contextmanager

import torch
from mmdet.registry import OPTIM_WRAPPERS
from mmengine.optim import OptimWrapper

__all__ = ['CPUAmpOptimWrapper']


@OPTIM_WRAPPERS.register_module()
class CPUAmpOptimWrapper(OptimWrapper):
    """``OptimWrapper`` whose forward runs under ``torch.autocast('cpu', dtype)``.

    Args:
        dtype (str): ``'bfloat16'`` (default) or ``'float16'``.
        **kwargs: those of ``OptimWrapper``.
    """

    def __init__(self, dtype: str = 'bfloat16', **kwargs):
        if dtype not in ('bfloat16', 'float16'):
            raise ValueError(f"dtype must be 'bfloat16' or 'float16', got {dtype!r}")
        super().__init__(**kwargs)
        self.cast_dtype = getattr(torch, dtype)

    @contextmanager
    def optim_context(self, model: torch.nn.Module):
        with super().optim_context(model), torch.autocast('cpu', dtype=self.cast_dtype):
            yield
