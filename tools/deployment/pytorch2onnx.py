"""Export a detector to ONNX: ``mmdet_detrx.tools.deployment.pytorch2onnx``
(installed: ``detrx-export``; same flags)."""
from mmdet_detrx.tools.console import export

if __name__ == '__main__':
    raise SystemExit(export())
