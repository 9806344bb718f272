"""Native op layer of mmdet-detrx (torch only: no mmcv / mmdet imports)."""
from .ms_deform_attn import *  # noqa: F401,F403
from .ms_deform_attn import __all__  # noqa: F401
