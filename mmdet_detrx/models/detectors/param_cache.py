"""Inference-only tensors derived from a module's parameters, cached on the module.

Shared by :mod:`.fold_frozen_bn` (BN folded into conv weights) and :mod:`.packed_linear`
(oneDNN-packed linear weights). Both derive a tensor from parameters and buffers that may change
at any time (``load_state_dict``, an optimizer step, ``.to()`` / ``.half()``, an in-place edit)
and must notice without hooks. A cached value is reused while each source is the same tensor
object on the same storage (held by weak references, so neither can be freed and its address
reused by a replacement, e.g. after ``.double()`` then ``.float()``) with the same version
counter, offset, shape, stride, dtype and device: an in-place write through the tensor
(``load_state_dict`` copies in place) bumps its version, ``.to()`` gives it new storage.

Not seen by the key: writes through ``param.data``, whose version counter is separate.
mmengine's ``EMAHook`` swaps the EMA weights in that way before a validation or test, and its
loops call ``model.eval()`` after that hook: :class:`DerivedCacheOwner` drops a module's caches
whenever its mode is set (``train()`` / ``eval()``), so each loop starts from the weights it runs
with. A ``.data`` write with no mode change in between is still not seen.

The cache lives in the module's ``__dict__``, not registered: state dicts are unchanged, and
:class:`DerivedCacheOwner` leaves it out of pickles and deep copies.
"""
import weakref
from typing import Callable, Iterable, Optional, TypeVar

import torch
import torch.nn as nn
from torch.multiprocessing.reductions import StorageWeakRef

__all__ = ['cached_derived', 'DerivedCacheOwner']

Derived = TypeVar('Derived')


def _tensor_state(t: Optional[torch.Tensor]) -> Optional[tuple]:
    if t is None:
        return None
    return (t.untyped_storage()._cdata, t.storage_offset(), t._version, t.shape, t.stride(),
            t.dtype, t.device)


class _DerivedCache:
    """A derived value and the state of the sources it was derived from."""
    __slots__ = ('value', 'extra', 'states', 'tensor_refs', 'storage_refs')

    def __init__(self, value, extra: tuple, sources: tuple):
        self.value, self.extra = value, extra
        self.states = tuple(_tensor_state(t) for t in sources)
        present = [t for t in sources if t is not None]
        self.tensor_refs = tuple(weakref.ref(t) for t in present)
        self.storage_refs = tuple(StorageWeakRef(t.untyped_storage()) for t in present)

    def matches(self, extra: tuple, sources: tuple) -> bool:
        present = [t for t in sources if t is not None]
        return (self.extra == extra and len(present) == len(self.tensor_refs)
                and all(ref() is t for ref, t in zip(self.tensor_refs, present))
                and self.states == tuple(_tensor_state(t) for t in sources))


def cached_derived(module: nn.Module, attr: str, sources: Iterable[Optional[torch.Tensor]],
                   derive: Callable[[], Derived], extra: tuple = ()) -> Derived:
    """``derive()`` under ``no_grad``, cached in ``module.__dict__[attr]`` and derived again
    when any of ``sources`` (``None`` allowed) or ``extra`` changes.

    With an inference tensor among the sources (no version counter) nothing is cached.
    """
    sources = tuple(sources)
    if any(t is not None and t.is_inference() for t in sources):
        with torch.no_grad():
            return derive()
    cache = module.__dict__.get(attr)
    if not isinstance(cache, _DerivedCache) or not cache.matches(extra, sources):
        with torch.no_grad():
            cache = _DerivedCache(derive(), extra, sources)
        module.__dict__[attr] = cache
    return cache.value


class DerivedCacheOwner:
    """First base of a module class that uses :func:`cached_derived`: setting its mode
    (``train()`` / ``eval()``) drops its caches, and pickles and deep copies leave them out
    (derived tensors, some in oneDNN's opaque layout)."""

    def train(self, mode: bool = True):
        for name in [name for name, value in self.__dict__.items()
                     if isinstance(value, _DerivedCache)]:
            del self.__dict__[name]
        return super().train(mode)

    def __getstate__(self):
        return {name: value for name, value in super().__getstate__().items()
                if not isinstance(value, _DerivedCache)}
