"""Former name of :mod:`mmdet_detrx.models.detectors.detrx`, which holds the ``...X`` detectors
(a module is named after the models it defines, not their mechanism); kept so that existing
``from mmdet_detrx.models.detectors.registry_attention import ...`` lines keep working."""
from .detrx import *  # noqa: F401,F403
from .detrx import __all__  # noqa: F401
