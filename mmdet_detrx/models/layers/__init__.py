from .adaptive_clustering_attention import *  # noqa: F401,F403
from .bottleneck_attention import *  # noqa: F401,F403
from .e2lsh import *  # noqa: F401,F403
from .multi_scale_deform_attn import *  # noqa: F401,F403
