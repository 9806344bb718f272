"""The configs that ship inside the package, by name (no clone needed).

The repository's ``configs/`` is installed as ``mmdet_detrx/.mim/configs/``, where mmengine looks
for package configs. Three ways to use one::

    # 1. any tool, mmdet's own included: pass the file
    python $MMDET/.mim/tools/train.py "$(python -m mmdet_detrx.config_path demo/x.py)"

    # 2. as a base, like mmdet:: (once mmdet_detrx is imported: our tools, or Python code that
    #    imports mmdet_detrx before Config.fromfile)
    _base_ = 'mmdet_detrx::demo/x.py'

    # 3. in Python
    from mmdet_detrx.config_path import get_config_path

``python -m mmdet_detrx.config_path`` lists the shipped configs; with a name it prints the
absolute path (for the shell, as above). mmengine 0.10 only accepts ``pkg::`` for the packages
in its ``MODULE2PACKAGE`` table and reads that table while parsing, before ``custom_imports`` run;
``mmdet_detrx.config_scheme.register_with_mmengine`` (called by ``import mmdet_detrx``) adds
this package to it. A
tool that parses the config before importing anything (mmdet's ``tools/train.py``) therefore
needs the file path (way 1) for its top-level config.
"""
import difflib
import os.path as osp
import sys
from glob import glob
from typing import List

from .config_scheme import register_with_mmengine  # noqa: F401  (re-exported, it lived here)

__all__ = ['CONFIG_ROOT', 'get_config_path', 'list_configs', 'register_with_mmengine']

CONFIG_ROOT = osp.join(osp.dirname(osp.abspath(__file__)), '.mim', 'configs')
SCHEME = 'mmdet_detrx::'


def list_configs() -> List[str]:
    """Names (``dir/config.py``, relative to the config root) of every runnable shipped config."""
    paths = glob(osp.join(CONFIG_ROOT, '**', '*.py'), recursive=True)
    return sorted(osp.relpath(p, CONFIG_ROOT) for p in paths
                  if '_base_' not in osp.relpath(p, CONFIG_ROOT).split(osp.sep))


def get_config_path(name: str) -> str:
    """Absolute path of a shipped config: ``'demo/x.py'`` or ``'mmdet_detrx::demo/x.py'``."""
    if not isinstance(name, str):
        raise TypeError(f'name must be a config name such as "demo/x.py", got {name!r}')
    if not name.strip() or name.strip() == SCHEME:
        raise ValueError(f'empty config name {name!r}: give one such as "demo/x.py" '
                         '(`python -m mmdet_detrx.config_path` lists them)')
    relative = name[len(SCHEME):] if name.startswith(SCHEME) else name
    path = osp.normpath(osp.join(CONFIG_ROOT, relative))
    if osp.commonpath([path, osp.normpath(CONFIG_ROOT)]) != osp.normpath(CONFIG_ROOT):
        raise ValueError(f'{name!r} is outside the shipped configs ({CONFIG_ROOT})')
    if not osp.isfile(path):
        if not osp.isdir(CONFIG_ROOT):
            raise FileNotFoundError(
                f'the shipped configs are missing ({CONFIG_ROOT} does not exist): reinstall '
                'mmdet-detrx (pip install .), or use the configs/ folder of a clone')
        close = difflib.get_close_matches(relative, list_configs(), n=3, cutoff=0.5)
        hint = f'; did you mean {" or ".join(close)}?' if close else (
            '; `python -m mmdet_detrx.config_path` lists them')
        raise FileNotFoundError(f'no shipped config {name!r}{hint}')
    return path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv in ([], ['--list']):
        print('\n'.join(list_configs()))
        return 0
    if len(argv) != 1 or argv[0].startswith('-'):
        print('usage: python -m mmdet_detrx.config_path [NAME]   (no NAME: list the configs)',
              file=sys.stderr)
        return 2
    try:
        print(get_config_path(argv[0]))
    except (FileNotFoundError, ValueError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
