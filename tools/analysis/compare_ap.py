"""Compare COCO AP with a paired bootstrap: ``mmdet_detrx.tools.analysis.compare_ap``
(installed: ``detrx-compare-ap``; same flags)."""
from mmdet_detrx.tools.console import compare_ap

if __name__ == '__main__':
    raise SystemExit(compare_ap())
