"""``convert(src, out_dir)``: checkpoint + ready config for our detector, all or nothing.

The steps every layout shares: load the source, pick its layout (detected unless named), let the
layout convert it, render the config (``_base_`` on the matching shipped/mmdet config, only the
diff), build the model from that config and load the weights strictly, and only then write the
checkpoint and the config -- each atomically (temporary file, fsync, rename; the umask decides
the mode). A failure at any step leaves nothing in ``out_dir`` (and removes ``out_dir`` if this
call created it).
"""
import io
import logging
import os
import os.path as osp
import re
import shutil
import tempfile
import textwrap
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from ._registry import (ConversionError, Converted, Layout, check_source, detect_layout,
                        get_layout)
from ._source import load_source

__all__ = ['convert', 'convert_source', 'ConversionResult', 'render_config', 'format_value',
           'compact_to_coco80']


@dataclass
class ConversionResult:
    config_path: str
    checkpoint_path: str
    layout: str
    classes: Tuple[str, ...]
    notes: List[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------- rendering
_IDENTIFIER = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*$')


def format_value(value, indent: int = 0, used: int = 0, width: int = 99) -> str:
    """``value`` as Python config source (``dict(...)`` for dicts), wrapped at ``width``:
    ``indent`` is the current line's indentation, ``used`` the characters already on it."""
    flat = _format_flat(value)
    if used + len(flat) <= width or not isinstance(value, (dict, list, tuple)) or not value:
        return flat
    inner = indent + 4
    pad = ' ' * inner
    if isinstance(value, dict):
        if all(isinstance(k, str) and _IDENTIFIER.match(k) for k in value):
            items = [f'{pad}{k}=' + format_value(v, inner, inner + len(k) + 1, width)
                     for k, v in value.items()]
            return 'dict(\n' + ',\n'.join(items) + ')'
        items = [f'{pad}{k!r}: ' + format_value(v, inner, inner + len(repr(k)) + 2, width)
                 for k, v in value.items()]
        return '{\n' + ',\n'.join(items) + '}'
    open_, close = ('[', ']') if isinstance(value, list) else ('(', ')')
    lines, line = [], ''  # pack short items on lines, as yapf does
    for item in value:
        text = format_value(item, inner, inner, width) + ','
        if line and inner + len(line) + 1 + len(text) > width:
            lines.append(line)
            line = text
        else:
            line = f'{line} {text}' if line else text
    lines.append(line)
    body = '\n'.join(pad + ln for ln in lines)
    if isinstance(value, list):
        body = body[:-1]  # no trailing comma in a list
    return open_ + '\n' + body + close


def _format_flat(value) -> str:
    if isinstance(value, dict):
        if all(isinstance(k, str) and _IDENTIFIER.match(k) for k in value):
            return 'dict(' + ', '.join(f'{k}={_format_flat(v)}' for k, v in value.items()) + ')'
        return '{' + ', '.join(f'{k!r}: {_format_flat(v)}' for k, v in value.items()) + '}'
    if isinstance(value, list):
        return '[' + ', '.join(_format_flat(v) for v in value) + ']'
    if isinstance(value, tuple):
        inner = ', '.join(_format_flat(v) for v in value)
        return f'({inner}, )' if len(value) == 1 else f'({inner})'
    if isinstance(value, float):
        return repr(round(value, 6))
    return repr(value)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _base_reference(base_config: str) -> str:
    """How the written config names its base: ``mmdet::``/absolute paths as given, a shipped
    config name as ``mmdet_detrx::name`` (our tools and Python code importing mmdet_detrx)."""
    if '::' in base_config or osp.isabs(base_config):
        return base_config
    return f'mmdet_detrx::{base_config}'


def _plain(value):
    """``value`` with tuples as lists and ConfigDicts as dicts, for comparing configs."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def prune_against_base(update: dict, base: dict) -> dict:
    """The entries of ``update`` that change ``base`` (merged the mmengine way): a written
    config shows only its diff. A ``_delete_`` dict replacing one of the same ``type`` becomes
    a plain update when it sets every key the base has."""
    out = {}
    for key, value in update.items():
        old = base.get(key) if isinstance(base, dict) else None
        if isinstance(value, dict) and isinstance(old, dict):
            if value.get('_delete_'):
                rest = {k: v for k, v in value.items() if k != '_delete_'}
                if rest.get('type') != old.get('type') or not set(old) <= set(rest):
                    out[key] = value
                    continue
                value = rest
            pruned = prune_against_base(value, old)
            if pruned:
                out[key] = pruned
        elif key not in base or _plain(old) != _plain(value):
            out[key] = value
    return out


def render_config(converted: Converted, checkpoint_name: str, header: str,
                  user_config: Optional[str] = None, base_model: Optional[dict] = None) -> str:
    """The config text: ``_base_`` + the model diff + class names + normalisation; with
    ``base_model`` (the base's ``model``) the entries equal to the base's are left out."""
    classes = tuple(str(c) for c in converted.classes)
    preprocessor = dict(mean=[round(float(m), 6) for m in converted.mean],
                        std=[round(float(s), 6) for s in converted.std],
                        bgr_to_rgb=bool(converted.bgr_to_rgb))
    if user_config is not None:
        base = osp.abspath(user_config)
        model = dict(data_preprocessor=preprocessor)
    else:
        base = _base_reference(converted.base_config)
        model = _merge(converted.model, dict(data_preprocessor=preprocessor,
                                             bbox_head=dict(num_classes=len(classes))))
    if base_model is not None:
        model = prune_against_base(model, base_model)
    lines = [f'# {line}' if line else '#' for line in header.splitlines()]
    lines += [f'_base_ = {base!r}',
              "custom_imports = dict(imports=['mmdet_detrx'], allow_failed_imports=False)", '',
              f'classes = {format_value(classes, 0, len("classes = "))}',
              'metainfo = dict(classes=classes)',
              f'model = {format_value(model, 0, len("model = "))}']
    for key, value in converted.config.items():
        lines.append(f'{key} = {format_value(value, 0, len(key) + 3)}')
    lines += ['train_dataloader = dict(dataset=dict(metainfo=metainfo))',
              'val_dataloader = dict(dataset=dict(metainfo=metainfo))',
              'test_dataloader = dict(dataset=dict(metainfo=metainfo))',
              '# the converted weights, next to this file',
              f"load_from = '{{{{ fileDirname }}}}/{checkpoint_name}'", '']
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------- validation
def _num_classes_of(cfg) -> Optional[int]:
    head = (cfg.get('model') or {}).get('bbox_head') or {}
    return head.get('num_classes')


def load_config(config_path: str):
    """``Config.fromfile`` with our modules and the ``mmdet_detrx::`` scheme registered."""
    import mmdet_detrx  # noqa: F401  registers our modules and the mmdet_detrx:: scheme
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    register_all_modules(init_default_scope=True)
    return Config.fromfile(config_path)


def build_model_from_config(config_path: str):
    """Our detector built from ``config_path`` (no weights initialised, eval mode)."""
    from mmdet.registry import MODELS
    cfg = load_config(config_path)
    model = MODELS.build(cfg.model)
    return model.eval(), cfg


def check_strict_load(model, state_dict) -> None:
    """Load ``state_dict`` into ``model`` strictly; a mismatch names the keys.

    The load runs first, so the model's own load hooks apply: on OneDL's mmdetection, DINOX widens
    mmdet 3.3's ``decoder.ref_point_head`` input weight (models/detectors/dino_ref_point_head.py),
    which keeps converted DINO checkpoints in the layout both stacks load.
    """
    try:
        model.load_state_dict(state_dict, strict=True)
        return
    except RuntimeError:
        pass  # name the keys below
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
              for k, v in state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f'{len(missing)} missing: ' + ', '.join(missing[:10]))
    if unexpected:
        problems.append(f'{len(unexpected)} unexpected: ' + ', '.join(unexpected[:10]))
    if shapes:
        problems.append(f'{len(shapes)} of another shape: ' + '; '.join(shapes[:10]))
    if problems:
        raise ConversionError('the converted weights do not load strictly into the model the '
                              'config builds: ' + ' | '.join(problems))
    model.load_state_dict(state_dict, strict=True)  # what else torch refuses, in its words


# ------------------------------------------------------------------------------------- naming
def _source_stem(src: str) -> str:
    path = osp.normpath(osp.abspath(src))
    name = osp.basename(path)
    parent = osp.basename(osp.dirname(path))
    if parent == 'snapshots' and re.fullmatch(r'[0-9a-f]{40}', name):  # HF hub cache
        name = osp.basename(osp.dirname(osp.dirname(path))).split('--')[-1]
    if osp.isfile(path):
        name = osp.splitext(name)[0]
    return re.sub(r'[^A-Za-z0-9_.+-]+', '_', name) or 'model'


def _checkpoint_bytes(state_dict, meta) -> bytes:
    buffer = io.BytesIO()
    torch.save({'state_dict': state_dict, 'meta': meta}, buffer)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------ convert
def compact_to_coco80(converted: Converted) -> None:
    """Keep the 80 real COCO classes of a classifier indexed by COCO category id (91 outputs,
    'N/A' in the gaps: facebook/detr-resnet-50, SenseTime/deformable-detr, the original
    repositories), in mmdet's CocoDataset order, so CocoDataset / CocoMetric score it.

    Sigmoid heads keep the source's scores exactly; DETR's softmax head renormalises over 81
    instead of 92 logits (the dropped 'N/A' ones are never a target in training, so near -inf).
    """
    from ._original_common import COCO80_CLASSES, COCO91_IDS, compact_coco91
    classes = list(converted.classes)
    if len(classes) != 91:
        raise ConversionError(f'coco80 needs 91 class outputs indexed by COCO category id; '
                              f'this checkpoint has {len(classes)}')
    renamed = [(classes[i], name) for i, name in zip(COCO91_IDS, COCO80_CLASSES)
               if classes[i].lower() != name and not classes[i].startswith('class_')]
    fc_cls = converted.state_dict.get('bbox_head.fc_cls.weight')
    softmax = fc_cls is not None and fc_cls.shape[0] == 92
    model = converted.model
    dino = str(model.get('type', '')).startswith('DINO')
    # Deformable DETR's two-stage head ranks proposals by its column 0: keep rows 0..79 there;
    # DINO ranks by the max over classes, so its proposal head is compacted like the others.
    proposal = (model.get('decoder', {}).get('num_layers')
                if model.get('as_two_stage') and not dino else None)
    converted.state_dict = compact_coco91(converted.state_dict, proposal_branch=proposal,
                                          background_last=softmax)
    converted.classes = list(COCO80_CLASSES)
    if softmax:
        how = ' (softmax renormalised over 81 logits instead of 92)'
    elif dino:
        how = (' (exact scores for the 80 classes; the proposal selection ignores the 11 N/A '
               "columns: it differs only where an N/A logit was a token's max)")
    else:
        how = ' (exact)'
    converted.notes.append(
        'coco80: kept the 80 COCO category-id outputs in mmdet CocoDataset order' + how
        + (f'; names taken from mmdet where the source differs: {renamed[:5]}'
           if renamed else ''))


def convert_source(src: str, out_dir: str, layout: Optional[str] = None,
                   config: Optional[str] = None, name: Optional[str] = None,
                   coco80: bool = False) -> ConversionResult:
    """:func:`convert` with the details: the layout used, the class names and the notes."""
    from mmdet_detrx.utils.atomic_checkpoint import atomic_write

    source = load_source(src)
    check_source(source)
    chosen: Layout = get_layout(layout) if layout else detect_layout(source)
    if layout:
        match = getattr(chosen, 'match_when_named', chosen.match)(source)  # see Layout
        if not match.full:
            detail = (f'first unmatched keys: {", ".join(match.unmatched[:8])}'
                      if match.unmatched else match.reason)
            raise ConversionError(f'{src} is not in layout {layout!r}: {detail}')
    converted = chosen.convert(source)
    if coco80:
        compact_to_coco80(converted)
    classes = tuple(str(c) for c in converted.classes)
    stem = name or f'{chosen.name}_{_source_stem(src)}'
    config_name, checkpoint_name = f'{stem}.py', f'{stem}.pth'

    if config is not None:
        from mmengine.config import Config
        if not osp.isfile(config):
            raise ConversionError(f'config {config} does not exist')
        given = _num_classes_of(Config.fromfile(config))
        if given is not None and given != len(classes):
            raise ConversionError(
                f'class-count mismatch: the checkpoint has {len(classes)} classes, the config '
                f'{config} has model.bbox_head.num_classes={given}')

    header = (f'Converted by mmdet_detrx.converters from {osp.abspath(src)}\n'
              f'layout {chosen.name!r}: {chosen.description}\n'
              f'  python tools/test.py {config_name} {checkpoint_name}   # evaluate\n'
              f'  python tools/train.py {config_name}   # fine-tune from the converted weights')
    if converted.notes:
        header += '\nNotes:\n' + '\n'.join(
            textwrap.fill(note, width=95, initial_indent='- ', subsequent_indent='  ')
            for note in converted.notes)

    created = not osp.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    config_path = osp.join(out_dir, config_name)
    checkpoint_path = osp.join(out_dir, checkpoint_name)
    staging = tempfile.mkdtemp(prefix='.convert-', dir=out_dir)
    written = []
    try:
        base = osp.abspath(config) if config else _base_reference(converted.base_config)
        base_probe = osp.join(staging, '_base_probe.py')
        with open(base_probe, 'w') as f:
            f.write(f'_base_ = {base!r}\n')
        base_model = _plain(load_config(base_probe).get('model') or {})
        text = render_config(converted, checkpoint_name, header, user_config=config,
                             base_model=base_model)
        staged_config = osp.join(staging, config_name)
        with open(staged_config, 'w') as f:
            f.write(text)
        model, cfg = build_model_from_config(staged_config)
        built_classes = _num_classes_of(cfg)
        if built_classes is not None and built_classes != len(classes):
            raise ConversionError(f'class-count mismatch: the checkpoint has {len(classes)} '
                                  f'classes, the config builds {built_classes}')
        check_strict_load(model, converted.state_dict)
        meta = dict(dataset_meta=dict(classes=classes), converted_from=osp.abspath(src),
                    layout=chosen.name, notes=list(converted.notes))
        atomic_write(checkpoint_path, _checkpoint_bytes(converted.state_dict, meta))
        written.append(checkpoint_path)
        atomic_write(config_path, text.encode())
    except BaseException:
        for path in written:  # a replaced earlier output is gone either way; never half of one
            if osp.exists(path):
                os.unlink(path)
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    for note in converted.notes:
        logging.getLogger('mmdet_detrx.converters').info(note)
    return ConversionResult(config_path=config_path, checkpoint_path=checkpoint_path,
                            layout=chosen.name, classes=classes, notes=list(converted.notes))


def convert(src: str, out_dir: str, layout: Optional[str] = None,
            config: Optional[str] = None, coco80: bool = False) -> Tuple[str, str]:
    """Convert the checkpoint ``src`` (a file, or an HF ``save_pretrained``/hub-snapshot folder)
    into ``out_dir``: returns ``(config_path, checkpoint_path)``.

    ``layout`` names the source format (:func:`list_layouts`); detected when None. ``config``
    (optional) is a config of ours to base the written one on instead of the layout's default:
    its ``num_classes`` must equal the checkpoint's. ``coco80`` keeps the 80 real classes of a
    91-output COCO-category-id classifier (:func:`compact_to_coco80`). Raises
    :class:`ConversionError` with the reason; nothing is left in ``out_dir`` then.
    """
    result = convert_source(src, out_dir, layout=layout, config=config, coco80=coco80)
    return result.config_path, result.checkpoint_path
