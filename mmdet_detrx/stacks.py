"""The mmdet stacks mmdet-detrx runs on, and the import-time check of the installed one.

Two families of distributions install the modules ``mmengine``, ``mmcv`` and ``mmdet``:

* ``openmmlab``: OpenMMLab's last releases (``mmengine``, ``mmcv``, ``mmdet``; frozen since 2024,
  and mmdet 3.3 refuses mmcv >= 2.2);
* ``onedl``: VBTI's maintained, import-compatible fork (``onedl-mmengine``, ``onedl-mmcv``,
  ``onedl-mmdetection``).

pip's metadata cannot stop a mix (OneDL's mmdet does not even require an mmcv), and a mix fails
late and far from its cause: mmdet 3.3 asserts on the mmcv version inside its ``__init__``, two
distributions of one module overwrite each other's files. :func:`check_stack` reads the installed
distributions (without importing them) and raises :class:`UnsupportedStackError` naming what was
found and a combination that works; ``mmdet_detrx/__init__.py`` calls it before anything imports
mmdet. Only the standard library is used here: ``setup.py`` reads :data:`STACKS` for its extras.
"""
import os
import re
from importlib import metadata

__all__ = ['STACKS', 'TESTED', 'ALLOW_UNTESTED_ENV', 'UnsupportedStackError', 'installed_stack',
           'check_stack', 'requirements', 'import_mmdet_quietly']

# module -> (distribution, supported versions) per family. The extras `[openmmlab]` / `[onedl]`
# are these requirements; `[mmdet]` is kept as the OpenMMLab one (what it always meant).
STACKS = {
    'openmmlab': {'mmengine': ('mmengine', '>=0.10.4,<0.11'),
                  'mmcv': ('mmcv', '>=2.0.0,<2.2.0'),
                  'mmdet': ('mmdet', '>=3.3.0,<3.4')},
    'onedl': {'mmengine': ('onedl-mmengine', '>=0.10.8,<0.11'),
              'mmcv': ('onedl-mmcv', '>=2.3.0,<2.4'),
              'mmdet': ('onedl-mmdetection', '>=3.5.0,<3.6')},
}
# What the test suite ran on (README, "Install notes"); named in the error as a working combination.
TESTED = {
    'openmmlab': 'mmengine==0.10.7 mmcv==2.1.0 mmdet==3.3.0',
    'onedl': 'onedl-mmengine==0.10.12 onedl-mmcv==2.3.6 onedl-mmdetection==3.5.1',
}
# Set to 1 to turn the check's error into a warning (a stack you are trying out).
ALLOW_UNTESTED_ENV = 'MMDET_DETRX_ALLOW_UNTESTED_STACK'

_MODULES = ('mmengine', 'mmcv', 'mmdet')


class UnsupportedStackError(RuntimeError):
    """The installed mmengine / mmcv / mmdet are not a combination mmdet-detrx supports.

    A ``RuntimeError``, not an ``ImportError``: mmengine's ``custom_imports`` replaces the message
    of an ``ImportError`` with ``Failed to import mmdet_detrx``.
    """


def requirements(stack: str):
    """``['mmengine>=0.10.4,<0.11', ...]``: the pip requirements of one stack."""
    return [f'{dist}{spec}' for dist, spec in STACKS[stack].values()]


def _release(version: str):
    """``'2.3.6'`` -> ``(2, 3, 6)``; pre/post/local parts are ignored (``2.0.0rc4`` -> 2.0.0)."""
    match = re.match(r'\d+(\.\d+)*', version)
    return tuple(int(part) for part in match.group(0).split('.')) if match else ()


def _pad(release, length=3):
    return release + (0, ) * (length - len(release))


def _satisfies(version: str, specifier: str) -> bool:
    release = _pad(_release(version))
    for clause in specifier.split(','):
        op, bound = re.match(r'\s*(>=|<=|==|<|>)\s*(\S+)', clause).groups()
        bound = _pad(_release(bound))
        if not {'>=': release >= bound, '<=': release <= bound, '==': release == bound,
                '<': release < bound, '>': release > bound}[op]:
            return False
    return True


def _installed(distribution: str):
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def installed_stack():
    """``{module: [(family, distribution, version), ...]}`` of the distributions installed."""
    found = {}
    for module in _MODULES:
        found[module] = []
        for family, modules in STACKS.items():
            distribution = modules[module][0]
            version = _installed(distribution)
            if version is not None:
                found[module].append((family, distribution, version))
    return found


def _describe(found) -> str:
    return ', '.join(f'{dist} {version}' for module in _MODULES
                     for _, dist, version in found[module]) or 'none'


def _fix(family=None) -> str:
    families = [family] if family else list(STACKS)
    return ' or '.join(f'`pip install {TESTED[name]}` ({name}; `make install STACK={name}` in a '
                       'clone)' for name in families)


def _problems(found):
    problems = []
    for module in _MODULES:
        if len(found[module]) > 1:
            problems.append(
                f'two distributions install the `{module}` module ('
                + ' and '.join(f'{dist} {version}' for _, dist, version in found[module])
                + '): their files overwrite each other; uninstall both, then install one stack')
    families = {family for module in _MODULES for family, _, _ in found[module]}
    if len(families) > 1:
        problems.append('the OpenMMLab and OneDL families are mixed ('
                        + '; '.join(f'{module} from {family}' for module in _MODULES
                                    for family, _, _ in found[module])
                        + '): install mmengine, mmcv and mmdet of one family')
    elif len(families) == 1:
        family = families.pop()
        for module in _MODULES:
            for _, dist, version in found[module]:
                spec = STACKS[family][module][1]
                if not _satisfies(version, spec):
                    problems.append(f'{dist} {version} is outside the supported {dist}{spec}')
    return problems


def import_mmdet_quietly() -> None:
    """Import ``mmdet.datasets`` with its standard output sent to standard error.

    OneDL's mmdetection ``print()``s ``Could not import OneDL. Skipping OneDL datasets.`` twice at
    import when its optional ``onedl`` SDK is absent (``print_log(..., level=DEBUG)`` without a
    logger prints), which would corrupt output meant for the shell, e.g.
    ``$(python -m mmdet_detrx.config_path NAME)``. Nothing happens if mmdet is already imported.
    """
    import contextlib
    import sys
    if 'mmdet.datasets' in sys.modules:
        return
    with contextlib.redirect_stdout(sys.stderr):
        import mmdet.datasets  # noqa: F401


def check_stack(found=None) -> None:
    """Raise :class:`UnsupportedStackError` if the installed stack is a mix or out of range.

    A module installed from neither family's distribution (a source tree on ``PYTHONPATH``)
    is not checked. ``MMDET_DETRX_ALLOW_UNTESTED_STACK=1`` turns the error into a warning.
    """
    found = installed_stack() if found is None else found
    problems = _problems(found)
    if not problems:
        return
    families = {family for module in _MODULES for family, _, _ in found[module]}
    message = (f'mmdet-detrx does not support this mmengine/mmcv/mmdet installation '
               f'(found {_describe(found)}): ' + '; '.join(problems) + '. A working combination: '
               + _fix(families.pop() if len(families) == 1 else None)
               + f'. ({ALLOW_UNTESTED_ENV}=1 makes this a warning.)')
    if os.environ.get(ALLOW_UNTESTED_ENV, '').strip().lower() in ('1', 'true', 'yes'):
        import warnings
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return
    raise UnsupportedStackError(message)
