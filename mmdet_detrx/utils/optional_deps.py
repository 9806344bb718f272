"""Optional dependencies: a missing one is an error naming the extra that installs it.

``import_optional('onnx', 'deploy', 'ONNX export')`` returns the module, or raises
:class:`MissingDependencyError` (a ``ModuleNotFoundError``, so ``except ImportError`` still
catches it) saying ``ONNX export needs onnx, which is not installed: pip install
"mmdet-detrx[deploy]"``. The extras are those of ``setup.py``.
"""
import importlib
from types import ModuleType

__all__ = ['MissingDependencyError', 'import_optional']


class MissingDependencyError(ModuleNotFoundError):
    """An optional dependency is not installed; the message names the extra to install
    (``extra``), so a command-line tool can print it as is."""

    def __init__(self, message: str, name: str, extra: str) -> None:
        super().__init__(message, name=name)
        self.extra = extra


def import_optional(module: str, extra: str, purpose: str) -> ModuleType:
    """``importlib.import_module(module)``, or an error naming ``extra`` and ``purpose``."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name not in (module, module.split('.')[0]):
            raise  # the module is there but one of its own imports failed: show that one
        raise MissingDependencyError(
            f'{purpose} needs {module.split(".")[0]}, which is not installed: '
            f'pip install "mmdet-detrx[{extra}]"', name=module, extra=extra) from error
