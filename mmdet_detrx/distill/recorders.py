"""Forward-hook recorders: capture what named submodules output, for knowledge distillation.

A :class:`ModuleOutputRecorder` hooks one submodule (``'encoder'``, ``'decoder.layers.5'``,
``'bbox_head'``) and appends its output, optionally narrowed by an index path, on each forward
call while it is enabled. A :class:`RecorderManager` holds several recorders over one model, so
a teacher and a student can be recorded under the same keys and compared term by term.

Useful outputs of mmdet's DETR (``L`` decoder layers, ``B`` images, ``Q`` queries, ``K`` classes):

======================  ===========  ===================================================
module                  index        recorded tensor
======================  ===========  ===================================================
``encoder``             --           memory, (B, H*W, C)
``decoder.layers.{i}``  --           decoder layer ``i`` query features, (B, Q, C)
``bbox_head``           ``0``        class logits of every decoder layer, (L, B, Q, K+1)
``bbox_head``           ``1``        sigmoid boxes (cx, cy, w, h) of every layer, (L, B, Q, 4)
``bbox_head``           ``(1, -1)``  boxes of the last decoder layer, (B, Q, 4)
======================  ===========  ===================================================
"""
import difflib
from typing import Any, Dict, List, Sequence, Tuple, Union

import torch.nn as nn

__all__ = ['ModuleOutputRecorder', 'RecorderManager', 'get_submodule']

Index = Union[None, int, str, Sequence[Union[int, str]]]


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)`` whose error lists the closest existing module names."""
    if not isinstance(name, str):
        raise TypeError(f'module name must be a str, got {type(name).__name__}')
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.5)
    hint = f'; close names: {close}' if close else ''
    raise ValueError(f'{type(model).__name__} has no submodule named {name!r}{hint}')


def _select(output: Any, index: Index) -> Any:
    if index is None:
        return output
    path: Tuple = (index, ) if isinstance(index, (int, str)) else tuple(index)
    for key in path:
        output = output[key]
    return output


class ModuleOutputRecorder:
    """Record the outputs of the submodule ``name`` of a model, one entry per forward call.

    Args:
        name (str): dotted submodule name, as in ``model.named_modules()``.
        index (int | str | sequence, optional): index path into the output, e.g. ``1`` for the
            second element of a tuple, ``(1, -1)`` for its last row, ``'key'`` for a dict.
            None records the output as is.

    Use it as a context manager, or call :meth:`register` / :meth:`remove` yourself.
    """

    def __init__(self, name: str, index: Index = None):
        if not isinstance(name, str):
            raise TypeError(f'name must be a str, got {type(name).__name__}')
        self.name = name
        self.index = index
        self.outputs: List[Any] = []
        self.enabled = True
        self._handle = None

    def register(self, model: nn.Module) -> 'ModuleOutputRecorder':
        if self._handle is not None:
            raise RuntimeError(f'recorder for {self.name!r} is already registered')
        module = get_submodule(model, self.name)
        self._handle = module.register_forward_hook(self._hook)
        return self

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def clear(self) -> None:
        self.outputs.clear()

    @property
    def last(self) -> Any:
        """The most recent recorded output."""
        if not self.outputs:
            raise RuntimeError(f'module {self.name!r} has not been called since the recorder '
                               'was last cleared')
        return self.outputs[-1]

    def _hook(self, module: nn.Module, inputs: Tuple, output: Any) -> None:
        if self.enabled:
            self.outputs.append(_select(output, self.index))

    def __enter__(self) -> 'ModuleOutputRecorder':
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
        self.clear()

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(name={self.name!r}, index={self.index!r}, '
                f'recorded={len(self.outputs)})')


class RecorderManager:
    """Several recorders over one model, addressed by key.

    Args:
        model (nn.Module): the model to record.
        sources (dict): ``{key: spec}``, spec being a module name or
            ``dict(module=name, index=...)``.

    Every module name is resolved at construction, so a typo fails before any forward pass,
    with the closest existing names in the message.
    """

    def __init__(self, model: nn.Module, sources: Dict[str, Union[str, dict]]):
        if not isinstance(sources, dict):
            raise TypeError(f'sources must be a dict of key -> module spec, '
                            f'got {type(sources).__name__}')
        self.recorders: Dict[str, ModuleOutputRecorder] = {}
        try:
            for key, spec in sources.items():
                self.recorders[key] = self._build(spec).register(model)
        except Exception:
            self.remove()
            raise

    @staticmethod
    def _build(spec: Union[str, dict]) -> ModuleOutputRecorder:
        if isinstance(spec, str):
            return ModuleOutputRecorder(spec)
        if isinstance(spec, dict) and 'module' in spec:
            unknown = set(spec) - {'module', 'index'}
            if unknown:
                raise ValueError(f'unknown recorder spec keys {sorted(unknown)}; '
                                 "expected 'module' and optional 'index'")
            return ModuleOutputRecorder(spec['module'], spec.get('index'))
        raise TypeError(f"a recorder spec is a module name or dict(module=..., index=...), "
                        f'got {spec!r}')

    def __getitem__(self, key: str) -> ModuleOutputRecorder:
        return self.recorders[key]

    def last(self, key: str) -> Any:
        return self.recorders[key].last

    @property
    def enabled(self) -> bool:
        return all(r.enabled for r in self.recorders.values())

    @enabled.setter
    def enabled(self, value: bool) -> None:
        for recorder in self.recorders.values():
            recorder.enabled = value

    def clear(self) -> None:
        for recorder in self.recorders.values():
            recorder.clear()

    def remove(self) -> None:
        for recorder in self.recorders.values():
            recorder.remove()

    def __enter__(self) -> 'RecorderManager':
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
        self.clear()
