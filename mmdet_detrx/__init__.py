"""mmdet-detrx: DETR-era components for MMDetection 3.x.

Importing the package (``custom_imports=dict(imports=['mmdet_detrx'])``) registers every
model, dataset and hook into MMDetection's registries (scope ``mmdet``).

Beyond registering under names of its own, the import makes these process-wide changes, each
kept because users rely on it with mmdet's own tools, which reach this package only through
``custom_imports`` (docs/import.md: every change, why, and what is left to explicit calls):

* checkpoints load without running code from them: mmengine's local and http(s) loaders, OneDL
  mmengine's ``_safe_torch_load``, ``Runner.resume`` and the inferencers (never executing a
  checkpoint's config text) go through ``utils/safe_checkpoint.py``
  (``MMDET_DETRX_TRUSTED_CHECKPOINTS=1`` opts in to full pickles);
* ``AmpOptimWrapper`` in mmdet's scope is mmengine's class with an accelerator and bf16
  ``CPUAmpOptimWrapper`` without one (``engine/optimizers/amp_optim_wrapper.py``);
* mmengine's configs accept ``_base_ = 'mmdet_detrx::dir/cfg.py'`` (``config_scheme.py``);
* mmengine's FLOP analysis counts our deformable attention op and scaled dot-product attention
  (``utils/complexity.py``);
* every model build first checks that registered attention types sit in a detector that builds
  them (``models/detectors/detrx.py``), so mmdet's plain detectors fail with a clear error.

``mmdet_detrx.ops`` needs only torch, so the native op layer stays usable (and testable) on a
machine without mmcv/mmdet; there the registries are simply not populated.
"""
from importlib.util import find_spec

from .version import __version__

if find_spec('mmdet') is not None:
    from .stacks import check_stack, import_mmdet_quietly
    check_stack()  # a mixed OpenMMLab/OneDL install fails here, by name
    import_mmdet_quietly()  # OneDL's mmdet prints a debug note to stdout at import
    from . import datasets, distill, engine, evaluation, models  # noqa: F401  (registration)
    from .utils import patch_mmengine_checkpoint_loading
    patch_mmengine_checkpoint_loading()
    from .config_scheme import register_with_mmengine  # `_base_ = 'mmdet_detrx::dir/cfg.py'`
    from .utils.complexity import register_flop_handles  # FLOPs of our ops in mmengine.analysis
    from .models.detectors import install_attention_type_check  # clear error for plain DETRs
    register_with_mmengine()
    register_flop_handles()
    install_attention_type_check()

__all__ = ['__version__']
