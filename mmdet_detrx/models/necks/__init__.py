from .simple_feature_pyramid import *  # noqa: F401,F403
