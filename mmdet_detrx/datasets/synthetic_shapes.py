"""The embedded default dataset: synthetic shapes in COCO format, generated on first use.

Images hold 1-``max_objects`` filled circles, squares and triangles of random colour, from small
(a few pixels) to large (most of the image), drawn in order so later shapes occlude earlier ones,
over varied backgrounds (flat, gradient, noise, stripes, checkerboard). Boxes, areas and RLE masks
describe the *visible* part of each shape (COCO's convention); shapes left mostly hidden are
dropped. Everything is a function of ``seed``: the same spec always gives the same files.

Layout written under ``data_root``::

    annotations/{train,val}.json   COCO instances (bbox + RLE segmentation)
    {train,val}/000000.png ...     images (sizes vary within ``image_size``)
    spec.json                      the generation parameters

The dataset then loads through mmdet's ``CocoDataset`` unchanged and scores with ``CocoMetric``.
"""
import difflib
import fcntl
import json
import math
import os
import os.path as osp
import shutil
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
from mmdet.datasets import CocoDataset
from mmdet.registry import DATASETS
from mmengine.logging import print_log
from pycocotools import mask as mask_utils

from ..utils.file_mode import current_umask

__all__ = ['SyntheticShapesDataset', 'generate_synthetic_shapes', 'SHAPE_CLASSES']

SHAPE_CLASSES = ('circle', 'square', 'triangle')
DEFAULT_SPEC = dict(seed=0, num_train=600, num_val=100, image_size=(160, 160), max_objects=6,
                    min_visible=0.35)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    kind = rng.integers(5)
    c0, c1 = rng.integers(0, 256, size=(2, 3))
    if kind == 0:  # flat
        img = np.broadcast_to(c0, (h, w, 3))
    elif kind == 1:  # linear gradient along a random direction
        theta = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w]
        t = (np.cos(theta) * xx / w + np.sin(theta) * yy / h)
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
        img = c0 + t[..., None] * (c1 - c0)
    elif kind == 2:  # coloured noise
        img = c0 + rng.normal(0, 40, size=(h, w, 3))
    elif kind == 3:  # stripes
        period = int(rng.integers(4, 24))
        stripes = ((np.arange(w) // period) % 2).astype(bool)
        img = np.where(stripes[None, :, None], c0, c1) * np.ones((h, 1, 1))
    else:  # checkerboard
        period = int(rng.integers(6, 30))
        yy, xx = np.mgrid[0:h, 0:w]
        board = ((yy // period + xx // period) % 2).astype(bool)
        img = np.where(board[..., None], c0, c1)
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_mask(rng: np.random.Generator, label: int, h: int, w: int) -> np.ndarray:
    """Full (unoccluded) mask of one shape; sizes span small to large on a log scale."""
    size = float(np.exp(rng.uniform(np.log(8), np.log(0.7 * min(h, w)))))
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    mask = np.zeros((h, w), np.uint8)
    if SHAPE_CLASSES[label] == 'circle':
        cv2.circle(mask, (int(cx), int(cy)), max(int(size / 2), 2), 1, thickness=-1)
    elif SHAPE_CLASSES[label] == 'square':
        rect = ((cx, cy), (size, size), float(rng.uniform(0, 90)))
        cv2.fillPoly(mask, [cv2.boxPoints(rect).astype(np.int32)], 1)
    else:  # triangle: equilateral, randomly rotated
        angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2, 4]) * np.pi / 3
        pts = np.stack([cx + size / 2 * np.cos(angles), cy + size / 2 * np.sin(angles)], 1)
        cv2.fillPoly(mask, [pts.astype(np.int32)], 1)
    return mask


def _render(rng: np.random.Generator, spec: dict) -> Tuple[np.ndarray, List[dict]]:
    max_w, max_h = spec['image_size']
    w = int(rng.integers(int(0.75 * max_w), max_w + 1))
    h = int(rng.integers(int(0.75 * max_h), max_h + 1))
    img = _background(rng, h, w).copy()
    shapes = []
    for _ in range(int(rng.integers(1, spec['max_objects'] + 1))):
        label = int(rng.integers(len(SHAPE_CLASSES)))
        mask = _shape_mask(rng, label, h, w)
        if mask.sum() < 16:  # centred off-image: nothing to draw
            continue
        img[mask.astype(bool)] = rng.integers(0, 256, size=3)
        shapes.append((label, mask))
    # Visible part of each shape = its mask minus every shape drawn above it.
    objects, covered = [], np.zeros((h, w), bool)
    for label, mask in reversed(shapes):
        full = mask.astype(bool)
        visible = full & ~covered
        covered |= full
        if visible.sum() < max(spec['min_visible'] * full.sum(), 9):
            continue
        objects.append(dict(label=label, mask=visible))
    return img, objects[::-1]


def _coco_split(rng: np.random.Generator, spec: dict, num_images: int, out_dir: str,
                img_dir: str) -> dict:
    images, annotations = [], []
    for image_id in range(num_images):
        img, objects = _render(rng, spec)
        file_name = f'{image_id:06d}.png'
        cv2.imwrite(osp.join(out_dir, img_dir, file_name), img)
        images.append(dict(id=image_id, file_name=file_name, height=img.shape[0],
                           width=img.shape[1]))
        for obj in objects:
            rle = mask_utils.encode(np.asfortranarray(obj['mask'].astype(np.uint8)))
            x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
            rle['counts'] = rle['counts'].decode('ascii')
            annotations.append(dict(id=len(annotations) + 1, image_id=image_id,
                                    category_id=obj['label'] + 1, bbox=[x, y, bw, bh],
                                    area=float(obj['mask'].sum()), segmentation=rle,
                                    iscrowd=0))
    categories = [dict(id=i + 1, name=name, supercategory='shape')
                  for i, name in enumerate(SHAPE_CLASSES)]
    return dict(images=images, annotations=annotations, categories=categories,
                info=dict(description='mmdet-detrx synthetic shapes', seed=spec['seed']))


_MAX_IMAGE_SIDE = 4096


def _spec_int(key: str, value, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or \
            (high is not None and value > high):
        bounds = f'>= {low}' if high is None else f'in [{low}, {high}]'
        raise ValueError(f'synthetic-shapes spec: {key} must be an int {bounds}, got {value!r}')
    return int(value)


def _normalise_spec(spec: dict) -> dict:
    """The spec with defaults filled in, every key known and every value in range."""
    unknown = sorted(set(spec) - set(DEFAULT_SPEC))
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), list(DEFAULT_SPEC), n=1)
            hints.append(f'{key!r}' + (f' (did you mean {close[0]!r}?)' if close else ''))
        raise KeyError(f'synthetic-shapes spec: unknown key(s) {", ".join(hints)}; the keys are '
                       f'{sorted(DEFAULT_SPEC)}')
    spec = {**DEFAULT_SPEC, **spec}
    spec['seed'] = _spec_int('seed', spec['seed'], 0)
    for key in ('num_train', 'num_val', 'max_objects'):
        spec[key] = _spec_int(key, spec[key], 1)
    size = spec['image_size']
    if not isinstance(size, (list, tuple)) or len(size) != 2:
        raise ValueError(f'synthetic-shapes spec: image_size must be (width, height), got '
                         f'{size!r}')
    spec['image_size'] = [_spec_int('image_size', v, 32, _MAX_IMAGE_SIDE) for v in size]
    visible = spec['min_visible']
    if isinstance(visible, bool) or not isinstance(visible, (int, float)) or \
            not math.isfinite(visible) or not 0 <= visible <= 1:
        raise ValueError('synthetic-shapes spec: min_visible (the fraction of a shape that must '
                         f'stay visible) must be a number in [0, 1], got {visible!r}')
    spec['min_visible'] = float(visible)
    return spec


_TMP_PREFIX = '.synthetic-shapes-'
_TMP_MARKER = '.detrx-synthetic-shapes-tmp'  # written first into every temporary folder


def _clean_stale_tmp(parent: str) -> None:
    """Remove temporary folders a killed generation left in ``parent``.

    Called with the parent's lock held: every generation into ``parent`` holds that lock from
    creating its temporary folder until renaming it, so any folder of ours found now is stale.
    Only folders carrying our marker file are touched.
    """
    for name in os.listdir(parent):
        path = osp.join(parent, name)
        if (name.startswith(_TMP_PREFIX) and osp.isdir(path) and not osp.islink(path)
                and osp.exists(osp.join(path, _TMP_MARKER))):
            shutil.rmtree(path, ignore_errors=True)


def _make_parent(data_root: str) -> str:
    parent = osp.dirname(data_root)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as error:
        raise PermissionError(
            f'cannot create the synthetic-shapes data_root {data_root!r}: {error.strerror} '
            f'({error.filename}). Point it at a writable folder, e.g. --cfg-options '
            'data_root=DIR with tools/train.py / tools/test.py, or MMDET_DETRX_DATA_ROOT=DIR '
            'for the embedded-dataset configs with any tool') from None
    return parent


def generate_synthetic_shapes(data_root: str, **spec) -> dict:
    """Write the dataset into ``data_root`` unless it already holds this spec; return the spec.

    Safe for concurrent callers (DDP ranks): generation runs under a file lock into a temporary
    folder renamed into place, so ``data_root`` is either complete or absent, never half-written;
    a temporary folder left by a killed generation is removed by the next one. The folder gets
    the usual permissions (``0o777 & ~umask``), so other users can read it.
    """
    spec = _normalise_spec(spec)
    if osp.islink(data_root.rstrip('/')) and not osp.exists(data_root):
        raise FileNotFoundError(
            f'the synthetic-shapes data_root {data_root!r} is a symlink to '
            f'{os.readlink(data_root.rstrip("/"))!r}, which does not exist: create that folder, '
            'or point data_root elsewhere (--cfg-options data_root=DIR, MMDET_DETRX_DATA_ROOT=DIR)')
    # A symlinked data_root (or parent) is generated where it points: the temporary folder is
    # renamed into place inside the real parent.
    data_root = osp.realpath(data_root)
    spec_file = osp.join(data_root, 'spec.json')
    parent = _make_parent(data_root)
    # Lock the parent folder itself: no lock file is left behind.
    lock = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if osp.exists(spec_file):
            with open(spec_file) as f:
                existing = json.load(f)
            if existing != spec:
                raise ValueError(
                    f'{data_root} holds synthetic shapes generated with {existing}, not the '
                    f'requested {spec}; choose another data_root or delete that folder')
            return spec
        if osp.exists(data_root) and os.listdir(data_root):
            raise FileExistsError(f'{data_root} exists and is not a synthetic-shapes dataset '
                                  '(no spec.json); choose another data_root')
        try:
            _clean_stale_tmp(parent)
            tmp = tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=parent)
        except OSError as error:
            raise PermissionError(
                f'cannot write the synthetic-shapes dataset into {parent!r}: {error}. Point '
                'data_root at a writable folder (--cfg-options data_root=DIR, or '
                'MMDET_DETRX_DATA_ROOT=DIR)') from None
        num_images = spec['num_train'] + spec['num_val']
        print_log(f'synthetic shapes: writing {num_images} images ({spec["num_train"]} train, '
                  f'{spec["num_val"]} val) and their COCO annotations into {data_root} (first '
                  'use; later runs reuse them)', logger='current')
        started = time.perf_counter()
        try:
            open(osp.join(tmp, _TMP_MARKER), 'w').close()
            rng = np.random.default_rng(spec['seed'])
            os.makedirs(osp.join(tmp, 'annotations'))
            for split in ('train', 'val'):
                os.makedirs(osp.join(tmp, split))
                coco = _coco_split(rng, spec, spec[f'num_{split}'], tmp, split)
                with open(osp.join(tmp, 'annotations', f'{split}.json'), 'w') as f:
                    json.dump(coco, f)
            with open(osp.join(tmp, 'spec.json'), 'w') as f:
                json.dump(spec, f)
            os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700
            if osp.exists(data_root):
                os.rmdir(data_root)  # empty, checked above
            os.rename(tmp, data_root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        os.remove(osp.join(data_root, _TMP_MARKER))
        print_log(f'synthetic shapes: done, {data_root} written in '
                  f'{time.perf_counter() - started:.1f} s', logger='current')
    finally:
        os.close(lock)  # also releases the lock
    return spec


@DATASETS.register_module()
class SyntheticShapesDataset(CocoDataset):
    """COCO-format synthetic shapes, generated into ``data_root`` on first use.

    Args:
        spec (dict): generation parameters (``seed``, ``num_train``, ``num_val``,
            ``image_size`` (max W, H), ``max_objects``, ``min_visible``); defaults in
            ``DEFAULT_SPEC``. Every dataset sharing a data_root must use the same spec.
        **kwargs: ``CocoDataset`` arguments (``data_root``, ``ann_file``, ``data_prefix``,
            ``pipeline``, ...), e.g. ``ann_file='annotations/val.json'``,
            ``data_prefix=dict(img='val/')``.
    """

    METAINFO = dict(classes=SHAPE_CLASSES,
                    palette=[(220, 20, 60), (0, 128, 255), (60, 180, 75)])

    def __init__(self, *args, spec: Dict = None, data_root: str = 'data/synthetic_shapes',
                 **kwargs):
        self.spec = generate_synthetic_shapes(data_root, **(spec or {}))
        super().__init__(*args, data_root=data_root, **kwargs)

