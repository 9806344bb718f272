"""Convert a checkpoint of another code base: ``mmdet_detrx.tools.model_converters.convert``
(installed: ``detrx-convert``; same flags)."""
from mmdet_detrx.tools.console import convert

if __name__ == '__main__':
    raise SystemExit(convert())
