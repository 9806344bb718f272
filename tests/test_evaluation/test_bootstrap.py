"""The numpy re-accumulation of COCO AP equals pycocotools, on all images and on resamples."""
import contextlib
import io

import numpy as np
import pytest

pytest.importorskip('pycocotools')
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from mmdet_detrx.evaluation.bootstrap import CocoImageEvals, bootstrap_ap  # noqa: E402

NUM_CATS = 4  # category 4 has detections but no ground truth: COCOeval's -1 entries


def synthetic_coco(seed=0, num_images=40, shift=6.0):
    """Ground truth (tiny and crowd boxes, images without any) and noisy detections of it.

    Scores are rounded to two decimals so that equal scores across images and within an image
    test COCOeval's tie order.
    """
    rng = np.random.default_rng(seed)
    images, annotations, detections = [], [], []
    for image_id in range(1, num_images + 1):
        images.append(dict(id=image_id, width=200, height=150, file_name=f'{image_id}.png'))
        for _ in range(rng.integers(0, 6) if image_id % 7 else 0):
            w, h = (rng.uniform(1, 4, 2) if rng.random() < 0.2 else rng.uniform(8, 80, 2))
            x, y = rng.uniform(0, 120), rng.uniform(0, 80)
            cat = int(rng.integers(1, NUM_CATS))
            annotations.append(dict(id=len(annotations) + 1, image_id=image_id, category_id=cat,
                                    bbox=[x, y, w, h], area=w * h,
                                    iscrowd=int(rng.random() < 0.1)))
            for _ in range(rng.integers(0, 3)):  # 0-2 detections per object
                dx, dy, dw, dh = rng.normal(0, shift * np.array([1, 1, 0.5, 0.5]))
                detections.append(dict(
                    image_id=image_id, bbox=[x + dx, y + dy, max(w + dw, 0.5), max(h + dh, 0.5)],
                    category_id=cat if rng.random() < 0.85 else int(rng.integers(1, NUM_CATS + 1)),
                    score=round(float(rng.uniform(0.05, 1.0)), 2)))
        for _ in range(rng.integers(0, 4)):  # false positives, some in the category without gt
            detections.append(dict(image_id=image_id, bbox=[*rng.uniform(0, 120, 2),
                                                            *rng.uniform(2, 60, 2)],
                                   category_id=int(rng.integers(1, NUM_CATS + 1)),
                                   score=round(float(rng.uniform(0.05, 0.9)), 2)))
    categories = [dict(id=c, name=f'c{c}') for c in range(1, NUM_CATS + 1)]
    return dict(images=images, annotations=annotations, categories=categories), detections


def coco_stats(dataset, detections, max_dets):
    """pycocotools' stats[0], stats[1] and precision with ``maxDets=max_dets`` (CocoMetric's)."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes([dict(d) for d in detections]), 'bbox')
        evaluation.params.maxDets = list(max_dets)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation.stats[0], evaluation.stats[1], evaluation.eval['precision']


def duplicated(dataset, detections, indices):
    """The images at ``indices`` (sorted ids), repeats renumbered, in draw order."""
    ids = sorted(image['id'] for image in dataset['images'])
    images, annotations, dets = [], [], []
    for new_id, index in enumerate(indices, start=1):
        old = ids[index]
        images.append(dict(id=new_id, width=200, height=150))
        annotations += [{**a, 'id': len(annotations) + k + 1, 'image_id': new_id}
                        for k, a in enumerate(a for a in dataset['annotations']
                                              if a['image_id'] == old)]
        dets += [{**d, 'image_id': new_id} for d in detections if d['image_id'] == old]
    return dict(images=images, annotations=annotations,
                categories=dataset['categories']), dets


@pytest.fixture(scope='module')
def data():
    return synthetic_coco()


@pytest.mark.parametrize('max_dets', [(100, 300, 1000), (1, 2, 3), (3, 100, 2)])
def test_all_images_equal_cocoeval(data, max_dets):
    # stats[0] reads maxDets=100 (-1 without it), stats[1] maxDets[2] (here 3 or 100 cut
    # detections: some image and category has more)
    dataset, detections = data
    evals = CocoImageEvals.from_coco(dataset, detections, max_dets=max_dets)
    expected = coco_stats(dataset, detections, max_dets)
    assert np.allclose(evals.ap(), expected[:2], rtol=0, atol=1e-12)
    for m, limit in enumerate(sorted(max_dets)):  # the whole precision array, every limit
        precision, has_gt = evals.precision(max_det=limit)
        reference = expected[2][:, :, :, 0, m].transpose(0, 2, 1)  # (T, K, R)
        assert np.array_equal(has_gt, (reference > -1).all(axis=(0, 2)))
        assert np.array_equal(precision[:, has_gt], reference[:, has_gt])


def test_resample_with_repeats_equals_cocoeval_on_duplicated_dataset(data):
    dataset, detections = data
    evals = CocoImageEvals.from_coco(dataset, detections)
    rng = np.random.default_rng(3)
    for size in (40, 17):
        indices = rng.integers(0, evals.num_images, size)
        assert len(set(indices.tolist())) < size  # some images drawn twice or more
        expected = coco_stats(*duplicated(dataset, detections, indices), (100, 300, 1000))
        assert np.allclose(evals.ap(indices), expected[:2], rtol=0, atol=1e-12)


def test_edge_cases(data):
    dataset, detections = data
    evals = CocoImageEvals.from_coco(dataset, detections)
    no_gt = [i for i, image_id in enumerate(evals.img_ids) if image_id % 7 == 0]
    assert evals.ap(no_gt) == (-1.0, -1.0)  # COCOeval: no category with ground truth
    assert CocoImageEvals.from_coco(dataset, []).ap() == (0.0, 0.0)
    with pytest.raises(IndexError, match='image indices'):
        evals.ap([evals.num_images])
    with pytest.raises(ValueError, match='three limits'):
        CocoImageEvals.from_coco(dataset, detections, max_dets=(100, ))


def test_paired_bootstrap(data):
    dataset, detections = data
    noisier = synthetic_coco(shift=12.0)[1]
    first = CocoImageEvals.from_coco(dataset, detections)
    second = CocoImageEvals.from_coco(dataset, noisier)
    result = bootstrap_ap([first, first, second], num_samples=50, seed=1,
                          names=['a', 'a again', 'noisy'])
    same, noisy = result['models'][1], result['models'][2]
    assert (same['dAP'], same['dAP_low'], same['dAP_high'], same['p_dAP_positive']) == (0, 0, 0,
                                                                                         0)
    assert same['AP_low'] == result['models'][0]['AP_low']
    assert noisy['dAP_low'] <= noisy['dAP'] <= noisy['dAP_high']
    assert result['samples'].shape == (3, 50, 2)
    again = bootstrap_ap([first, first, second], num_samples=50, seed=1)
    assert np.array_equal(again['samples'], result['samples'])
    other_gt = CocoImageEvals.from_coco(synthetic_coco(seed=1)[0], [])
    with pytest.raises(ValueError, match='same test set'):
        bootstrap_ap([first, other_gt], num_samples=2)
