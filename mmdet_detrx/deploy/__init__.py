"""Deployment: export DETR-family detectors to ONNX and check them in ONNX Runtime.

Needs ``onnx`` (and ``onnxruntime`` for the parity helpers); imported explicitly
(``from mmdet_detrx.deploy import export_detector_onnx``), not by ``import mmdet_detrx``.
See docs/deployment.md.
"""
from .detection_export_wrapper import *  # noqa: F401,F403
from .msda_decomposition import *  # noqa: F401,F403
from .msda_export_mode import *  # noqa: F401,F403
from .msda_plugin import *  # noqa: F401,F403
from .onnx_export import *  # noqa: F401,F403
from .onnx_parity import *  # noqa: F401,F403
