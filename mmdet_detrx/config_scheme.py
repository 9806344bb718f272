"""``_base_ = 'mmdet_detrx::dir/config.py'`` in configs, as mmengine accepts ``mmdet::``.

Kept apart from :mod:`mmdet_detrx.config_path` (the command line): ``import mmdet_detrx`` calls
:func:`register_with_mmengine`, and a module the package imports cannot also run cleanly as
``python -m`` (runpy warns that it was imported before being executed as ``__main__``).
"""

__all__ = ['register_with_mmengine']


def register_with_mmengine() -> None:
    """Make mmengine accept ``_base_ = 'mmdet_detrx::dir/config.py'`` (as ``mmdet::``).

    mmengine maps the scheme to a name it then locates with ``importlib.util.find_spec``
    (``osp.dirname(spec.origin)`` + ``.mim/configs``) when no distribution of that name exists.
    This module's name satisfies both: it is no distribution and its directory is the package's,
    for a wheel, an editable install and ``PYTHONPATH`` alike (a distribution's recorded location
    is wrong for editable installs).
    """
    from mmengine.config import utils as config_utils
    config_utils.MODULE2PACKAGE.setdefault('mmdet_detrx', __name__)
