"""Native op layer of mmdet-detrx (torch only: no mmcv / mmdet imports).

``_library`` loads the extension (``torch.ops.detrx.*``); each op module below adds its Python
API and ``torch.library`` registrations. A new op is one import line here.
"""
from ._library import native_available  # noqa: F401
from .dropout import dropout  # noqa: F401
from .ms_deform_attn import *  # noqa: F401,F403
from .ms_deform_attn import __all__ as _ms_deform_attn_all

__all__ = ['native_available', 'dropout', *_ms_deform_attn_all]
