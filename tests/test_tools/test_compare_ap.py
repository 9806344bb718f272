"""compare_ap (mmdet_detrx/tools/analysis/) scores COCO result JSONs against one ground truth."""
import json

import pytest

pytest.importorskip('pycocotools')
from mmdet_detrx.tools.analysis import compare_ap  # noqa: E402


def write_json(path, value):
    with open(path, 'w') as f:
        json.dump(value, f)
    return str(path)


@pytest.fixture
def files(tmp_path):
    """Three images, two categories; `good` finds every box, `poor` half of them."""
    boxes = {1: [(1, [10, 10, 20, 20]), (2, [50, 50, 10, 30])], 2: [(1, [5, 5, 40, 40])],
             3: [(2, [30, 10, 15, 15]), (1, [60, 60, 20, 10])]}
    ann = dict(images=[dict(id=i, width=100, height=100) for i in boxes],
               categories=[dict(id=1, name='a'), dict(id=2, name='b')], annotations=[])
    good, poor = [], []
    for image_id, objects in boxes.items():
        for k, (cat, (x, y, w, h)) in enumerate(objects):
            ann['annotations'].append(dict(id=len(ann['annotations']) + 1, image_id=image_id,
                                           category_id=cat, bbox=[x, y, w, h], area=w * h,
                                           iscrowd=0))
            good.append(dict(image_id=image_id, category_id=cat, bbox=[x + 1, y, w, h],
                             score=0.9 - 0.1 * k))
            poor.append(dict(image_id=image_id, category_id=cat,
                             bbox=[x + (0 if k else 0.6 * w), y, w, h], score=0.5))
    return (write_json(tmp_path / 'ann.json', ann), write_json(tmp_path / 'good.bbox.json', good),
            write_json(tmp_path / 'poor.bbox.json', poor))


def test_compare_ap(files, tmp_path, capsys):
    ann, good, poor = files
    out = tmp_path / 'out'
    rows = compare_ap.main([ann, good, good, poor, '--names', 'good', 'same',
                                         'poor', '--bootstrap', '20', '--out-dir', str(out)])
    assert [r['name'] for r in rows] == ['good', 'same', 'poor']
    assert 'dAP' not in rows[0] and rows[0]['AP_low'] <= rows[0]['AP'] <= rows[0]['AP_high']
    assert (rows[1]['dAP'], rows[1]['dAP_low'], rows[1]['dAP_high']) == (0, 0, 0)
    assert rows[2]['dAP'] < 0 and rows[2]['p_dAP_positive'] == 0
    printed = capsys.readouterr().out
    assert '| model | AP | AP 95% CI |' in printed
    assert 'same: ΔAP +0.00 [0.00, 0.00], P(ΔAP>0) 0.000: not distinguishable' in printed
    assert (out / 'compare_ap.md').read_text().strip() == printed.strip()
    assert (out / 'compare_ap.csv').read_text().startswith('name,AP,AP50,AP_low')


def test_compare_ap_without_bootstrap_names_files(files):
    ann, good, poor = files
    rows = compare_ap.main([ann, good, poor, '--bootstrap', '0'])
    assert [r['name'] for r in rows] == ['good', 'poor']
    assert rows[0]['AP'] > rows[1]['AP']
    assert rows[1]['dAP'] == pytest.approx(rows[1]['AP'] - rows[0]['AP'])


def test_compare_ap_rejects_a_non_result_json(files):
    ann, good, _ = files
    with pytest.raises(ValueError, match='COCO result list'):
        compare_ap.main([ann, good, ann, '--bootstrap', '0'])


def test_max_dets_without_100_is_refused(files, capsys):
    """Issue 27.4: AP is read at 100 detections; without that limit COCOeval reports -1 and the
    tool printed AP -100 for both models and 'not distinguishable'."""
    ann, good, poor = files
    with pytest.raises(SystemExit):
        compare_ap.main([ann, good, poor, '--bootstrap', '0', '--max-dets', '10', '300', '1000'])
    assert '--max-dets must include 100' in capsys.readouterr().err
    rows = compare_ap.main([ann, good, poor, '--bootstrap', '0',
                            '--max-dets', '1000', '100', '300'])  # any order: COCOeval sorts
    assert all(row['AP'] >= 0 for row in rows)
