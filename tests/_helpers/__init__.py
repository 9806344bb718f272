"""Test-only helpers shared by several test files (import as ``from _helpers import ...``).

``tests/`` is on ``sys.path`` because ``tests/conftest.py`` lives there (pytest's default
``prepend`` import mode); ``conftest.py`` also inserts it explicitly for other import modes.
"""
import importlib.util
import os.path as osp
import sys

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
REPO_CONFIGS = osp.join(REPO_ROOT, 'configs')


def load_tool(path: str, name: str = None):
    """Import a script under ``tools/`` (not a package) as a module.

    ``path`` is relative to the repository root, e.g. ``'tools/analysis/benchmark_msda.py'``.
    A folder with a ``_common.py`` (``tools/analysis``) goes on ``sys.path``, as when its
    scripts run, so their ``from _common import ...`` resolves; other folders do not
    (``tools/test.py`` would shadow the standard library's ``test`` package).
    """
    path = osp.join(REPO_ROOT, path)
    folder = osp.dirname(path)
    if osp.exists(osp.join(folder, '_common.py')) and folder not in sys.path:
        sys.path.insert(0, folder)
    name = name or osp.splitext(osp.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
