from .coco_folder import *  # noqa: F401,F403
from .synthetic_shapes import *  # noqa: F401,F403
