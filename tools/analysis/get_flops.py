"""Count FLOPs of a detector: ``mmdet_detrx.tools.analysis.get_flops``
(installed: ``detrx-get-flops``; same flags)."""
from mmdet_detrx.tools.console import get_flops

if __name__ == '__main__':
    raise SystemExit(get_flops())
