"""Train a detector: ``mmdet_detrx.tools.train`` (installed: ``detrx-train``; same flags)."""
from mmdet_detrx.tools.console import train

if __name__ == '__main__':
    raise SystemExit(train())
