from .losses import *  # noqa: F401,F403
from .recorders import *  # noqa: F401,F403
