"""Evaluate a checkpoint: ``mmdet_detrx.tools.test`` (installed: ``detrx-test``; same flags)."""
from mmdet_detrx.tools.console import test

if __name__ == '__main__':
    raise SystemExit(test())
