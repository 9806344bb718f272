"""``AmpOptimWrapper`` that also works without a GPU: what mmdet's ``tools/train.py --amp`` sets.

mmdet 3.3's ``tools/train.py --amp`` writes ``optim_wrapper.type='AmpOptimWrapper'`` and
``loss_scale='dynamic'`` into the config, and mmengine's ``AmpOptimWrapper`` asserts a
GPU/NPU/MLU/MUSA device, so ``--amp`` fails on CPU. This factory is registered under that name
in mmdet's ``OPTIM_WRAPPERS`` (a child of mmengine's, so it is what the name resolves to in
mmdet's scope once ``mmdet_detrx`` is imported):

* with an accelerator it returns mmengine's ``AmpOptimWrapper`` built from the same arguments
  (nothing changes on GPUs);
* on CPU it returns :class:`CPUAmpOptimWrapper` in bfloat16, whose fp32-sized exponent needs no
  loss scaling (``loss_scale`` is accepted and unused); float16 on CPU is refused, because
  without loss scaling its small exponent range underflows gradients.

The same decision, accelerator or not, is written once here: :func:`amp_optim_wrapper_cfg` gives
the ``optim_wrapper`` config our ``tools/train.py --amp`` and ``benchmark_detectors.py``'s bf16
training use.
"""
import copy
from typing import Optional

import torch
from mmdet.registry import OPTIM_WRAPPERS
from mmengine.device import is_cuda_available, is_mlu_available, is_musa_available, \
    is_npu_available
from mmengine.logging import print_log
from mmengine.optim import AmpOptimWrapper as MMEngineAmpOptimWrapper

from .cpu_amp_optim_wrapper import CPUAmpOptimWrapper

__all__ = ['amp_optim_wrapper_cfg', 'build_amp_optim_wrapper']


def _has_accelerator() -> bool:
    return (is_cuda_available() or is_npu_available() or is_mlu_available()
            or is_musa_available())


def amp_optim_wrapper_cfg(optim_wrapper, device: Optional[str] = None):
    """A copy of the ``optim_wrapper`` config for mixed-precision training.

    ``device``: where training runs (``'cpu'``, ``'cuda'``, ...); None decides by the machine
    (an accelerator: GPU/NPU/MLU/MUSA, what mmengine's ``AmpOptimWrapper`` requires). With an accelerator:
    mmengine's ``AmpOptimWrapper`` (fp16, ``loss_scale='dynamic'`` unless the config sets one);
    on CPU: :class:`CPUAmpOptimWrapper` in bfloat16 (no loss scaling: bf16 has fp32's exponent
    range).
    """
    optim_wrapper = copy.deepcopy(optim_wrapper)
    if (_has_accelerator() if device is None else device != 'cpu'):
        optim_wrapper['type'] = 'AmpOptimWrapper'
        optim_wrapper.setdefault('loss_scale', 'dynamic')
    else:
        optim_wrapper['type'] = 'CPUAmpOptimWrapper'
        optim_wrapper['dtype'] = 'bfloat16'
    return optim_wrapper


@OPTIM_WRAPPERS.register_module(name='AmpOptimWrapper')
def build_amp_optim_wrapper(loss_scale='dynamic', dtype=None, use_fsdp: bool = False,
                            **kwargs):
    """mmengine's ``AmpOptimWrapper`` on accelerators, bf16 :class:`CPUAmpOptimWrapper` on CPU."""
    if _has_accelerator():
        return MMEngineAmpOptimWrapper(loss_scale=loss_scale, dtype=dtype, use_fsdp=use_fsdp,
                                       **kwargs)
    if dtype not in (None, 'bfloat16', torch.bfloat16):
        raise ValueError(f'AmpOptimWrapper on CPU runs bfloat16 autocast (no loss scaling); '
                         f'dtype={dtype!r} is not supported without a GPU: drop '
                         "optim_wrapper.dtype or set it to 'bfloat16'")
    if use_fsdp:
        raise ValueError('AmpOptimWrapper(use_fsdp=True) needs a GPU')
    print_log('AmpOptimWrapper without a GPU: bfloat16 autocast on CPU (CPUAmpOptimWrapper); '
              f'loss_scale={loss_scale!r} is not needed in bf16 and unused', logger='current')
    return CPUAmpOptimWrapper(dtype='bfloat16', **kwargs)
