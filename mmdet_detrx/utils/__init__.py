from .atomic_checkpoint import (AtomicLocalBackend, atomic_write, checkpoint_problem,
                                find_resumable_checkpoint, use_atomic_checkpoints)
from .cfg_options import check_cfg_option_keys, merge_cfg_options, rebase_data_root
from .file_mode import current_umask
from .image_files import IMAGE_EXTENSIONS, list_images, output_names
from .malloc_tuning import MALLOC_ENV, tune_malloc
from .safe_checkpoint import (TRUSTED_CHECKPOINTS_ENV, CorruptCheckpointError,
                              UnsafeCheckpointError, load_checkpoint_file,
                              mmengine_checkpoint_globals, patch_mmengine_checkpoint_loading,
                              restricted_load, trusted_checkpoints)
from .setup_env import check_dataset_files, distributed_teardown, setup_cpu_distributed

__all__ = [
    'check_dataset_files', 'setup_cpu_distributed', 'distributed_teardown',
    'patch_mmengine_checkpoint_loading', 'IMAGE_EXTENSIONS', 'list_images', 'output_names',
    'TRUSTED_CHECKPOINTS_ENV', 'UnsafeCheckpointError', 'CorruptCheckpointError',
    'restricted_load', 'load_checkpoint_file',
    'mmengine_checkpoint_globals', 'trusted_checkpoints', 'AtomicLocalBackend', 'atomic_write',
    'checkpoint_problem', 'find_resumable_checkpoint', 'use_atomic_checkpoints',
    'check_cfg_option_keys', 'merge_cfg_options', 'rebase_data_root', 'current_umask',
    'MALLOC_ENV', 'tune_malloc'
]
