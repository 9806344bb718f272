from .checkpoint_match_hook import *  # noqa: F401,F403
from .distillation_hook import *  # noqa: F401,F403
from .num_classes_check_hook import *  # noqa: F401,F403
