from .mtkd_detr import *  # noqa: F401,F403
from .detrx import *  # noqa: F401,F403
from .channels_last import *  # noqa: F401,F403
from .dino_aux import *  # noqa: F401,F403
from .fold_frozen_bn import *  # noqa: F401,F403
from .packed_linear import *  # noqa: F401,F403
from .native_dropout import *  # noqa: F401,F403
