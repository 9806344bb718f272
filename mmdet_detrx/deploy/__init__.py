"""Deployment: export DETR-family detectors to ONNX and check them in ONNX Runtime.

Needs ``onnx`` (and ``onnxruntime`` for the parity helpers); imported explicitly
(``from mmdet_detrx.deploy import export_detector_onnx``), not by ``import mmdet_detrx``.
See docs/deployment.md. Without onnx the import fails naming the extra (``mmdet-detrx[deploy]``).
"""
from mmdet_detrx.utils.optional_deps import import_optional

import_optional('onnx', 'deploy', 'ONNX export (mmdet_detrx.deploy)')

from .detection_export_wrapper import *  # noqa: F401,F403,E402
from .msda_decomposition import *  # noqa: F401,F403,E402
from .msda_export_mode import *  # noqa: F401,F403,E402
from .msda_plugin import *  # noqa: F401,F403,E402
from .onnx_export import *  # noqa: F401,F403,E402
from .onnx_parity import *  # noqa: F401,F403,E402
