"""The tools users run, installed with the package (no clone needed).

``mmdet_detrx/tools/<path>.py`` mirrors the clone's ``tools/<path>.py`` (now thin wrappers): each
module has ``main(argv=None)`` and runs as ``python -m mmdet_detrx.tools.<path>`` with the flags
of the script; the ``detrx-*`` console scripts (``console.py``) call the same ``main``. The
helpers they share live in ``common.py``. Importing this package imports nothing else.
"""
