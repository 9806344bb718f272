from .botnet import *  # noqa: F401,F403
from .tnt import *  # noqa: F401,F403
from .torchvision_resnet import *  # noqa: F401,F403
from .vit import *  # noqa: F401,F403
from .token_checkpoint import load_converted_checkpoint  # noqa: F401 (ViT/TNT checkpoints)
