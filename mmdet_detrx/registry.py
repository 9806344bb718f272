"""The ``mmdet_detrx`` registry scope: children of mmdet's registries, for shipped configs.

A config based on one of ours (``_base_ = 'mmdet_detrx::demo/x.py'``) gets ``_scope_ =
'mmdet_detrx'`` on every inherited object mmengine gives no other scope, exactly as a config based
on ``mmdet::`` gets ``_scope_='mmdet'``. mmengine then imports ``mmdet_detrx.registry`` and
looks for registries of that scope. These are empty children of mmdet's registries: a lookup
falls through to mmdet (where ``import mmdet_detrx`` registers all our modules) and then to
mmengine, so such objects build exactly as under ``default_scope='mmdet'``.
"""
from mmdet import registry as _mmdet_registry
from mmengine.registry import Registry

# Every registry mmdet defines (mmdet.registry has no __all__).
__all__ = sorted(name for name, value in vars(_mmdet_registry).items()
                 if isinstance(value, Registry) and value.scope == 'mmdet')


def _child(parent: Registry) -> Registry:
    # The same lazy-import locations as mmdet's: resolving a name through this scope imports
    # mmdet's modules as resolving it through mmdet's would.
    return Registry(parent.name, parent=parent, scope='mmdet_detrx',
                    locations=list(getattr(parent, '_locations', [])))


for _name in __all__:
    globals()[_name] = _child(getattr(_mmdet_registry, _name))
del _name
