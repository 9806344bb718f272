from .setup_env import check_dataset_files, setup_cpu_distributed

__all__ = ['check_dataset_files', 'setup_cpu_distributed']
