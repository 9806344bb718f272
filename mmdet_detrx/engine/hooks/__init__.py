from .checkpoint_match_hook import *  # noqa: F401,F403
from .distillation_hook import *  # noqa: F401,F403
