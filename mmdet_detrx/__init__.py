"""mmdet-detrx: DETR-era components for MMDetection 3.x.

Importing the package (``custom_imports=dict(imports=['mmdet_detrx'])``) registers every
model, dataset and hook into MMDetection's registries (scope ``mmdet``).

Beyond registering, the import changes two things for the whole process (docs/tools.md):
mmengine's local and http(s) checkpoint loaders load with ``weights_only=True`` and exactly the
globals mmengine's own checkpoints need allow-listed (``utils/safe_checkpoint.py``; opt out for
trusted legacy pickles with ``MMDET_DETRX_TRUSTED_CHECKPOINTS=1``), and ``AmpOptimWrapper`` in
mmdet's scope falls back to bf16 autocast on machines without a GPU
(``engine/optimizers/amp_optim_wrapper.py``); on GPUs it is mmengine's class.

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
    register_with_mmengine()
    register_flop_handles()

__all__ = ['__version__']
