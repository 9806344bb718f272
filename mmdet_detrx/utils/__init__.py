from .checkpoint_compat import patch_mmengine_checkpoint_loading
from .image_files import IMAGE_EXTENSIONS, list_images
from .setup_env import check_dataset_files, distributed_teardown, setup_cpu_distributed

__all__ = [
    'check_dataset_files', 'setup_cpu_distributed', 'distributed_teardown',
    'patch_mmengine_checkpoint_loading', 'IMAGE_EXTENSIONS', 'list_images'
]
