from .branch_coco_metric import *  # noqa: F401,F403
