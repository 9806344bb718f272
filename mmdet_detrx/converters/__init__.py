"""Checkpoint converters: DETR-family weights from other code bases into our ``...X`` detectors.

``convert(src, out_dir, layout=None) -> (config_path, checkpoint_path)`` reads a checkpoint file
or an HF ``save_pretrained``/hub-snapshot folder, detects its layout (or takes ``layout``), and
writes an mmengine checkpoint (``state_dict``, ``meta['dataset_meta']['classes']``) plus a ready
config whose ``_base_`` is the matching shipped/mmdet config (docs/converters.md).

Each source format is one module here that registers a :class:`Layout` (``@register_layout``);
every module not starting with ``_`` is imported when this package is, so a new format is a new
file. ``python -m mmdet_detrx.tools.model_converters.convert SRC OUT_DIR [--from LAYOUT]`` is the
command line.
"""
import importlib
import pkgutil

from ._convert import ConversionResult, convert, convert_source, render_config
from ._registry import (IMAGENET_MEAN_255, IMAGENET_STD_255, ConversionError, Converted,
                        KeyPatternLayout, Layout, LayoutMatch, Source, apply_key_rules,
                        check_source, detect_layout, get_layout, list_layouts,
                        match_key_patterns, register_layout, register_source_check)
from ._source import load_source, read_safetensors, write_safetensors

__all__ = [
    'convert', 'convert_source', 'ConversionResult', 'ConversionError', 'Converted', 'Layout',
    'KeyPatternLayout', 'LayoutMatch', 'Source', 'apply_key_rules', 'detect_layout',
    'get_layout', 'list_layouts', 'load_source', 'match_key_patterns', 'register_layout',
    'register_source_check', 'check_source', 'render_config', 'read_safetensors',
    'write_safetensors', 'IMAGENET_MEAN_255', 'IMAGENET_STD_255'
]


def _import_layouts() -> None:
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith('_'):
            importlib.import_module(f'{__name__}.{module.name}')


_import_layouts()
