from .mtkd_detr import *  # noqa: F401,F403
from .registry_attention import *  # noqa: F401,F403
