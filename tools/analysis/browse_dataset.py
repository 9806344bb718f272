"""Draw a dataset's annotations: ``mmdet_detrx.tools.analysis.browse_dataset``
(installed: ``detrx-browse-dataset``; same flags)."""
from mmdet_detrx.tools.console import browse_dataset

if __name__ == '__main__':
    raise SystemExit(browse_dataset())
