"""Test-only helpers shared by several test files (import as ``from _helpers import ...``).

``tests/`` is on ``sys.path`` because ``tests/conftest.py`` lives there (pytest's default
``prepend`` import mode); ``conftest.py`` also inserts it explicitly for other import modes.
"""
import importlib.util
import os.path as osp

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
REPO_CONFIGS = osp.join(REPO_ROOT, 'configs')


def load_tool(path: str, name: str = None):
    """Import a script that is not part of a package (CI scaffolding such as
    ``'build_tools/cuda_link_check.py'``, relative to the repository root) as a module. The user tools
    are package modules: ``from mmdet_detrx.tools.analysis import get_flops``.
    """
    path = osp.join(REPO_ROOT, path)
    name = name or osp.splitext(osp.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def count_calls(monkeypatch, owner, name: str) -> list:
    """Wrap ``owner.<name>`` (e.g. ``torch.nn.functional, 'batch_norm'``) for the test; the
    returned list grows by one at each call."""
    calls = []
    function = getattr(owner, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return calls
