from .synthetic_shapes import *  # noqa: F401,F403
