from .distillation_hook import *  # noqa: F401,F403
