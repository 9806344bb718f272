from .botnet import *  # noqa: F401,F403
