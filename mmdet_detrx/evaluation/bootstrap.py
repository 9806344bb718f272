"""Exact, paired bootstrap of COCO bbox AP from one per-image COCO evaluation per model.

Efron's percentile bootstrap resamples the test images with replacement and recomputes the
statistic on each resample. Re-running ``COCOeval`` per resample costs minutes per model;
here pycocotools' ``COCOeval.evaluate()`` runs **once** (per image and category: detections
sorted by score, greedy matches at the 10 IoU thresholds, area range 'all', the largest of
``max_dets`` detections), and :meth:`CocoImageEvals.ap` redoes ``COCOeval.accumulate()`` +
``summarize()`` vectorised in numpy on any multiset of images:

per category, the selected images' detections (an image drawn twice counts twice, in draw
order, as in a dataset where the copies were renumbered), a stable sort by score, cumulative
TP/FP at each IoU threshold, precision ``tp / (tp + fp + eps)``, its non-increasing envelope read
at the 101 recall thresholds (0 past the last recall reached), and the mean over IoU thresholds,
recall thresholds and categories with non-ignored ground truth (``COCOeval``'s -1 entries
excluded; -1 when no category has any). The floating-point operations are pycocotools' own, so
the result equals ``COCOeval.stats[0]`` / ``stats[1]`` on the (duplicated) image set up to the
order of the final mean (~1e-16).

:func:`bootstrap_ap` draws the resamples once and scores every model on the same ones, so the
interval of the difference "model i minus model 0" is paired: shared per-image difficulty
cancels, which an interval per model cannot show. Resampled COCO AP runs high (the interpolated
precision is a running maximum; noise raises maxima), so a model's interval sits above its AP;
the paired difference much less so (docs/tools.md).

``CocoMetric`` sets ``COCOeval.params.maxDets`` to its ``proposal_nums`` (default
``(100, 300, 1000)``) and reports ``bbox_mAP = stats[0]`` and ``bbox_mAP_50 = stats[1]``.
``COCOeval.summarize`` reads them at different detection limits: ``stats[0]`` at the literal
``maxDets=100`` (-1 when 100 is not among ``maxDets``), ``stats[1]`` at ``maxDets[2]`` (1000),
per image and category. :meth:`CocoImageEvals.ap` does the same with ``max_dets`` (default
CocoMetric's), so its numbers are CocoMetric's.
"""
import contextlib
import io
import json
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ['CocoImageEvals', 'bootstrap_ap']

COCO_METRIC_MAX_DETS = (100, 300, 1000)  # CocoMetric's proposal_nums -> COCOeval maxDets
STATS0_MAX_DET = 100  # COCOeval.summarize: stats[0] = _summarize(1), whose maxDets defaults to 100


def _as_coco(gt):
    """A pycocotools ``COCO`` from a ``COCO``, a dataset dict or a JSON path."""
    from pycocotools.coco import COCO
    if isinstance(gt, COCO):
        return gt
    coco = COCO()
    if isinstance(gt, dict):
        coco.dataset = gt
    else:
        with open(gt) as f:
            coco.dataset = json.load(f)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _as_results(coco_gt, detections):
    """``COCO.loadRes`` of a result list or JSON path (an empty list gives an empty result)."""
    from pycocotools.coco import COCO
    if not isinstance(detections, (list, tuple)):
        with open(detections) as f:
            detections = json.load(f)
    with contextlib.redirect_stdout(io.StringIO()):
        if detections:
            # loadRes writes area/id/segmentation into the dicts: keep the caller's untouched
            return coco_gt.loadRes([dict(d) for d in detections])
        empty = COCO()
        empty.dataset = dict(images=list(coco_gt.dataset['images']), annotations=[],
                             categories=list(coco_gt.dataset.get('categories', [])))
        empty.createIndex()
        return empty


def _min_true_positives(num_gt: np.ndarray, rec_thrs: np.ndarray) -> np.ndarray:
    """``m[k, r]``: the fewest true positives ``c`` with ``c / num_gt[k] >= rec_thrs[r]``.

    ``np.searchsorted(tp / num_gt, rec_thr, 'left')`` (COCOeval's recall look-up) is the first
    position where the cumulative TP count reaches this integer, found with the same float
    division and comparison, so integer searches replace float ones without changing a result.
    Entries of categories without ground truth are 0 (they are excluded from the mean).
    """
    n = np.maximum(num_gt, 1).astype(np.float64)[:, None]  # (K, 1)
    rec = rec_thrs[None, :]  # (1, R)
    count = np.maximum(np.ceil(rec * n), 0)
    while True:  # ceil is within one of the answer; walk to the exact float boundary
        lower = (count > 0) & ((count - 1) / n >= rec)
        higher = count / n < rec
        if not (lower.any() or higher.any()):
            break
        count = count - lower + higher
    count[num_gt == 0] = 0
    return count.astype(np.int64)


@dataclass
class CocoImageEvals:
    """Per-image COCO bbox matches of one model, re-accumulated on any multiset of images.

    Build with :meth:`from_coco`. Arrays (``T`` IoU thresholds, ``I`` images, ``K``
    categories, ``D`` detections kept after ``max(max_dets)``, grouped by image then category):

    Attributes:
        img_ids (np.ndarray): (I,) image ids, sorted (``image_indices`` index this).
        cat_ids (np.ndarray): (K,) category ids, sorted.
        iou_thrs (np.ndarray): (T,) IoU thresholds; rec_thrs (np.ndarray): (R,) recall ones.
        max_dets (tuple): COCOeval's ``maxDets``, sorted; detections per image and category
            beyond the largest were not matched.
        num_gt (np.ndarray): (I, K) non-ignored ground truths (not crowd, area in range).
        det_start, det_count (np.ndarray): (I,) each image's slice of the detection arrays.
        det_cat (np.ndarray): (D,) category index; det_score (np.ndarray): (D,) score.
        det_position (np.ndarray): (D,) place in its image and category by score (0: best),
            which a smaller detection limit keeps when ``det_position < limit``.
        det_tp, det_fp (np.ndarray): (T, D) bool, matched / unmatched and not ignored.
        det_rank (np.ndarray): (D,) dense rank of (category, -score): sorting a resample's
            detections by it, stably, is COCOeval's per-category ``mergesort`` of scores.
    """
    img_ids: np.ndarray
    cat_ids: np.ndarray
    iou_thrs: np.ndarray
    rec_thrs: np.ndarray
    max_dets: Tuple[int, ...]
    num_gt: np.ndarray
    det_start: np.ndarray
    det_count: np.ndarray
    det_cat: np.ndarray
    det_score: np.ndarray
    det_position: np.ndarray
    det_tp: np.ndarray
    det_fp: np.ndarray
    det_rank: np.ndarray

    @classmethod
    def from_coco(cls, gt, detections, cat_ids: Optional[Sequence[int]] = None,
                  img_ids: Optional[Sequence[int]] = None,
                  max_dets: Sequence[int] = COCO_METRIC_MAX_DETS) -> 'CocoImageEvals':
        """Match ``detections`` to ``gt`` per image and category with pycocotools, once.

        Args:
            gt: ground truth: a pycocotools ``COCO``, a COCO dataset dict or a JSON path.
            detections: COCO results (dicts with ``image_id``, ``category_id``, ``bbox`` as
                x, y, w, h, ``score``), or the path of such a JSON (CocoMetric's
                ``{outfile_prefix}.bbox.json``).
            cat_ids: categories to score (default: all of ``gt``, as CocoMetric when the
                dataset's classes are the file's).
            img_ids: images to score (default: all of ``gt``).
            max_dets: COCOeval's ``maxDets``, at least three (``summarize`` reads the third):
                CocoMetric's ``proposal_nums``.
        """
        from pycocotools.cocoeval import COCOeval
        max_dets = tuple(sorted(int(m) for m in max_dets))  # COCOeval.evaluate sorts them
        if len(max_dets) < 3:
            raise ValueError(f'max_dets needs three limits (COCOeval.summarize reads maxDets[2] '
                             f'for AP50), got {max_dets}')
        coco_gt = _as_coco(gt)
        evaluation = COCOeval(coco_gt, _as_results(coco_gt, detections), 'bbox')
        params = evaluation.params
        params.imgIds = sorted(coco_gt.getImgIds()) if img_ids is None else list(img_ids)
        if cat_ids is not None:
            params.catIds = list(cat_ids)
        params.maxDets = [max_dets[-1]]  # smaller limits are truncations of these matches
        params.areaRng, params.areaRngLbl = params.areaRng[:1], params.areaRngLbl[:1]  # 'all'
        with contextlib.redirect_stdout(io.StringIO()):
            evaluation.evaluate()  # sorts and de-duplicates imgIds and catIds
        return cls.from_eval_imgs(evaluation.evalImgs, params.imgIds, params.catIds,
                                  params.iouThrs, params.recThrs, max_dets)

    @classmethod
    def from_eval_imgs(cls, eval_imgs: List[Optional[dict]], img_ids: Sequence[int],
                       cat_ids: Sequence[int], iou_thrs, rec_thrs,
                       max_dets: Sequence[int]) -> 'CocoImageEvals':
        """From ``COCOeval.evalImgs`` of one area range: entry ``k * I + i`` is (cat k, img i)."""
        num_images, num_cats, num_thrs = len(img_ids), len(cat_ids), len(iou_thrs)
        if len(eval_imgs) != num_images * num_cats:
            raise ValueError(f'expected {num_images} x {num_cats} evalImgs (one area range), '
                             f'got {len(eval_imgs)}')
        num_gt = np.zeros((num_images, num_cats), dtype=np.int64)
        per_image = [[] for _ in range(num_images)]
        for k in range(num_cats):
            for i in range(num_images):
                entry = eval_imgs[k * num_images + i]
                if entry is None:
                    continue
                num_gt[i, k] = np.count_nonzero(np.asarray(entry['gtIgnore']) == 0)
                if len(entry['dtScores']):
                    per_image[i].append((k, entry))
        det_count = np.array([sum(len(e['dtScores']) for _, e in entries)
                              for entries in per_image], dtype=np.int64)
        entries = [item for items in per_image for item in items]
        if entries:
            det_cat = np.concatenate([np.full(len(e['dtScores']), k) for k, e in entries])
            det_score = np.concatenate([np.asarray(e['dtScores'], np.float64)
                                        for _, e in entries])
            det_position = np.concatenate([np.arange(len(e['dtScores'])) for _, e in entries])
            matched = np.concatenate([e['dtMatches'] for _, e in entries], axis=1)
            ignored = np.concatenate([e['dtIgnore'] for _, e in entries], axis=1)
        else:
            det_cat, det_score, det_position = np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
            matched = ignored = np.zeros((num_thrs, 0))
        # COCOeval.accumulate: a match is a non-zero gt id; ignored detections count as neither
        det_tp = np.logical_and(matched, np.logical_not(ignored))
        det_fp = np.logical_and(np.logical_not(matched), np.logical_not(ignored))
        order = np.lexsort((-det_score, det_cat))
        new_key = np.ones(len(order), dtype=bool)
        new_key[1:] = ((det_cat[order][1:] != det_cat[order][:-1]) |
                       (det_score[order][1:] != det_score[order][:-1]))
        det_rank = np.empty(len(order), dtype=np.int64)
        det_rank[order] = np.cumsum(new_key) - 1
        return cls(img_ids=np.asarray(img_ids), cat_ids=np.asarray(cat_ids),
                   iou_thrs=np.asarray(iou_thrs, np.float64),
                   rec_thrs=np.asarray(rec_thrs, np.float64),
                   max_dets=tuple(sorted(int(m) for m in max_dets)), num_gt=num_gt,
                   det_start=np.cumsum(det_count) - det_count, det_count=det_count,
                   det_cat=det_cat.astype(np.int64), det_score=det_score,
                   det_position=det_position.astype(np.int64), det_tp=det_tp,
                   det_fp=det_fp, det_rank=det_rank)

    @property
    def num_images(self) -> int:
        return len(self.img_ids)

    def precision(self, image_indices: Optional[Sequence[int]] = None,
                  max_det: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """COCOeval's interpolated precision on the images ``image_indices`` (repeats count).

        ``max_det``: detections per image and category (default the largest of ``max_dets``).

        Returns:
            precision (np.ndarray): (T, K, R), ``COCOeval.eval['precision'][:, :, :, 0, m]``
                (``m``: the index of ``max_det``) as (T, K, R), for categories with ground truth.
            has_gt (np.ndarray): (K,) bool, categories with non-ignored ground truth (the others
                are COCOeval's -1 entries; their rows here are meaningless).
        """
        if image_indices is None:
            images = np.arange(self.num_images)
        else:
            images = np.asarray(image_indices, dtype=np.int64).reshape(-1)
            if images.size and (images.min() < 0 or images.max() >= self.num_images):
                raise IndexError(f'image indices must lie in [0, {self.num_images}), got '
                                 f'{images.min()}..{images.max()}')
        num_thrs, num_cats, num_rec = len(self.iou_thrs), len(self.cat_ids), len(self.rec_thrs)
        num_gt = self.num_gt[images].sum(0)  # (K,)
        counts = self.det_count[images]
        total = int(counts.sum())
        # the drawn images' detections, image after image in draw order ...
        dets = np.repeat(self.det_start[images] - (np.cumsum(counts) - counts), counts)
        dets += np.arange(total)
        if max_det is not None and max_det < max(self.max_dets):
            dets = dets[self.det_position[dets] < max_det]
            total = len(dets)
        # ... then grouped by category and sorted by score, ties kept in that order
        dets = dets[np.argsort(self.det_rank[dets], kind='stable')]
        cats = self.det_cat[dets]
        cat_range = np.arange(num_cats)
        seg_start = np.searchsorted(cats, cat_range, 'left')  # (K,)
        seg_end = np.searchsorted(cats, cat_range, 'right')

        def per_category_cumsum(flags):  # (T, total) cumulative counts restarting per category
            running = np.cumsum(flags[:, dets], axis=1, dtype=np.int32)  # 3x faster than int64
            before = np.concatenate([np.zeros((num_thrs, 1), np.int32), running], axis=1)
            return running - before[:, seg_start[cats]]

        tp = per_category_cumsum(self.det_tp)
        fp = per_category_cumsum(self.det_fp)
        tp_float, fp_float = tp.astype(np.float64), fp.astype(np.float64)
        precision = tp_float / (fp_float + tp_float + np.spacing(1))  # (T, total)

        # Recall look-up as integer searchsorted on one flat, sorted key: per (t, k), tp plus
        # an offset that keeps every category's and threshold's keys above the previous ones.
        cat_offset = seg_start + cat_range  # (K,)
        row_stride = total + num_cats + 1
        row_offset = np.arange(num_thrs)[:, None] * row_stride  # (T, 1)
        keys = (tp.astype(np.int64) + cat_offset[cats][None, :] + row_offset).reshape(-1)
        wanted = (_min_true_positives(num_gt, self.rec_thrs)[None] + cat_offset[None, :, None] +
                  row_offset[:, :, None])  # (T, K, R)
        first = np.searchsorted(keys, wanted.reshape(-1), 'left').reshape(wanted.shape)
        first -= np.arange(num_thrs)[:, None, None] * total
        first = np.minimum(first, seg_end[None, :, None])  # == seg_end: recall never reached

        # Envelope max(precision[first_r:end]) = max over blocks [first_r, first_r+1), ...,
        # [first_R-1, end): one reduceat, then a running max over the R blocks.
        bounds = np.concatenate([first, np.broadcast_to(seg_end[None, :, None],
                                                        (num_thrs, num_cats, 1))], axis=2)
        bounds = bounds + np.arange(num_thrs)[:, None, None] * total  # (T, K, R + 1) flat
        flat = np.concatenate([precision.reshape(-1), [0.0]])  # reduceat needs index < len
        blocks = np.maximum.reduceat(flat, bounds.reshape(-1)).reshape(bounds.shape)[..., :-1]
        blocks[bounds[..., :-1] >= bounds[..., 1:]] = 0.0  # empty block (or recall not reached)
        interpolated = np.maximum.accumulate(blocks[..., ::-1], axis=2)[..., ::-1]
        assert interpolated.shape == (num_thrs, num_cats, num_rec)
        return interpolated, num_gt > 0

    def ap(self, image_indices: Optional[Sequence[int]] = None) -> Tuple[float, float]:
        """(AP, AP50) on ``image_indices`` (default all), as ``COCOeval.stats[0]``, ``[1]``.

        AP at 100 detections per image and category, AP50 at ``max_dets[2]``, as
        ``COCOeval.summarize`` reads them (CocoMetric's ``bbox_mAP``, ``bbox_mAP_50``). A
        repeated index counts the image again (a bootstrap resample). -1 where COCOeval has -1:
        no selected image has ground truth, or 100 is not among ``max_dets`` (AP).
        """
        limits = dict(AP=STATS0_MAX_DET, AP50=self.max_dets[2])
        most_per_category = int(self.det_position.max()) + 1 if self.det_position.size else 0
        computed = {}  # a limit no image and category reaches keeps every detection: share it
        values = {}
        for name, limit in limits.items():
            if name == 'AP' and limit not in self.max_dets:
                values[name] = -1.0
                continue
            key = min(limit, max(most_per_category, 1))
            if key not in computed:
                computed[key] = self.precision(image_indices, limit)
            precision, has_gt = computed[key]
            if not has_gt.any():
                values[name] = -1.0
            elif name == 'AP':
                values[name] = float(precision[:, has_gt].mean())
            else:
                iou50 = np.flatnonzero(self.iou_thrs == 0.5)  # summarize: iouThr == p.iouThrs
                values[name] = (float(precision[iou50][:, has_gt].mean()) if iou50.size
                                else -1.0)
        return values['AP'], values['AP50']


def _interval(values: np.ndarray, confidence: float) -> Tuple[float, float]:
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_ap(evals: Sequence[CocoImageEvals], num_samples: int = 1000, seed: int = 0,
                 confidence: float = 0.95,
                 names: Optional[Sequence[str]] = None) -> Dict[str, Union[int, float, list]]:
    """Paired percentile bootstrap of AP and AP50 of several models on the same images.

    Each resample draws ``num_images`` image indices with replacement
    (``np.random.default_rng(seed).integers``) and every model is scored on that same multiset,
    so ``AP_i - AP_0`` is a paired difference.

    Args:
        evals: one :class:`CocoImageEvals` per model, all on the same images and ground truth;
            the first is the reference of the differences.
        num_samples: resamples; seed: their seed; confidence: of the percentile intervals.
        names: model names for the rows (default ``model0``, ``model1``, ...).

    Returns:
        dict with ``num_images``, ``num_samples``, ``seed``, ``confidence``, ``samples``
        ((models, num_samples, 2) array of resampled (AP, AP50)) and ``models``: one dict per
        model with ``name``, ``AP``, ``AP50`` (all images), ``AP_low``/``AP_high``,
        ``AP50_low``/``AP50_high`` (intervals), and for models after the first ``dAP``,
        ``dAP_low``, ``dAP_high``, ``dAP50``, ``dAP50_low``, ``dAP50_high`` (this model minus
        the first, point value on all images and paired interval) and ``p_dAP_positive`` (the
        fraction of resamples where its AP beats the first's). Values are fractions, not x100.
    """
    if not evals:
        raise ValueError('bootstrap_ap needs at least one CocoImageEvals')
    if num_samples < 1:
        raise ValueError(f'num_samples must be >= 1, got {num_samples}')
    if not 0 < confidence < 1:
        raise ValueError(f'confidence must lie in (0, 1), got {confidence}')
    names = [f'model{i}' for i in range(len(evals))] if names is None else list(names)
    if len(names) != len(evals):
        raise ValueError(f'{len(names)} names for {len(evals)} models')
    reference = evals[0]
    for name, other in zip(names[1:], evals[1:]):
        if not (np.array_equal(other.img_ids, reference.img_ids)
                and np.array_equal(other.cat_ids, reference.cat_ids)
                and np.array_equal(other.num_gt, reference.num_gt)):
            raise ValueError(f'{name} was not scored on the images, categories and ground truth '
                             f'of {names[0]}: a paired bootstrap needs the same test set')
    num_images = reference.num_images
    rng = np.random.default_rng(seed)
    samples = np.empty((len(evals), num_samples, 2))
    for b in range(num_samples):
        images = rng.integers(0, num_images, num_images)
        for m, model in enumerate(evals):
            samples[m, b] = model.ap(images)
    rows = []
    full = [model.ap() for model in evals]
    for m, name in enumerate(names):
        row = dict(name=name, AP=full[m][0], AP50=full[m][1])
        row['AP_low'], row['AP_high'] = _interval(samples[m, :, 0], confidence)
        row['AP50_low'], row['AP50_high'] = _interval(samples[m, :, 1], confidence)
        if m > 0:
            delta = samples[m] - samples[0]
            row['dAP'], row['dAP50'] = full[m][0] - full[0][0], full[m][1] - full[0][1]
            row['dAP_low'], row['dAP_high'] = _interval(delta[:, 0], confidence)
            row['dAP50_low'], row['dAP50_high'] = _interval(delta[:, 1], confidence)
            row['p_dAP_positive'] = float(np.mean(delta[:, 0] > 0))
        rows.append(row)
    return dict(num_images=num_images, num_samples=num_samples, seed=seed,
                confidence=confidence, samples=samples, models=rows)
