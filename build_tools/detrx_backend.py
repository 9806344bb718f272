"""PEP 517 build backend of mmdet-detrx: setuptools', built against the environment's own torch.

The extension must be compiled against the torch it will run with. With build isolation (pip's
default) the build runs in a temporary environment that hides the one being installed into;
naming torch in ``build-system.requires`` would download a second torch there (a CUDA build of
several GB, of whatever version is newest), and the extension would then not load with the
user's own torch. So ``requires`` lists only the build tools, and this wrapper, before delegating
every hook to ``setuptools.build_meta``, makes the *target* environment's installed torch
importable (appended to ``sys.path``, after the isolated build tools). The interpreter running
the build is the target environment's (pip always builds with ``sys.executable``), so its
``site-packages`` are the right place to look. Nothing is downloaded. Without isolation
(``--no-build-isolation``) torch is already importable and nothing changes.

When no torch is found, ``setup.py`` stops with what to run (install torch first, or
``MMDET_DETRX_NO_EXT=1`` for a build without the extension).
"""
import importlib.util
import os
import site
import sys
import sysconfig

from setuptools import build_meta as _setuptools

__all__ = ['build_editable', 'build_sdist', 'build_wheel', 'get_requires_for_build_editable',
           'get_requires_for_build_sdist', 'get_requires_for_build_wheel',
           'prepare_metadata_for_build_editable', 'prepare_metadata_for_build_wheel']


def _environment_site_dirs():
    """site-packages of the interpreter's environment (and the user site), whether or not pip's
    isolation removed them from sys.path."""
    names = ('purelib', 'platlib')
    dirs = [sysconfig.get_paths()[name] for name in names]
    try:
        dirs += site.getsitepackages()
    except AttributeError:  # some embedded interpreters
        pass
    user_site = getattr(site, 'USER_SITE', None)
    if user_site:
        dirs.append(user_site)
    return [d for d in dict.fromkeys(dirs) if d and os.path.isdir(d)]


def _expose_environment_torch():
    if os.environ.get('MMDET_DETRX_NO_EXT') == '1' or importlib.util.find_spec('torch'):
        return
    for site_dir in _environment_site_dirs():
        if os.path.isfile(os.path.join(site_dir, 'torch', '__init__.py')):
            if site_dir not in sys.path:
                sys.path.append(site_dir)  # after the isolated build tools: they keep priority
            importlib.invalidate_caches()
            print(f'mmdet-detrx: building against the environment\'s torch in {site_dir}',
                  file=sys.stderr)
            return
    # Not found: setup.py reports it with instructions when it imports torch.


def _hook(name):
    upstream = getattr(_setuptools, name)

    def hook(*args, **kwargs):
        _expose_environment_torch()
        return upstream(*args, **kwargs)

    hook.__name__ = name
    hook.__doc__ = upstream.__doc__
    return hook


for _name in __all__:
    globals()[_name] = _hook(_name)
del _name
