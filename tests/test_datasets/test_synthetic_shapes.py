import hashlib
import json
import os
import os.path as osp

import numpy as np
import pytest
from mmdet.registry import DATASETS
from pycocotools.coco import COCO

import mmdet_detrx  # noqa: F401
from mmdet_detrx.datasets import SHAPE_CLASSES, generate_synthetic_shapes

SPEC = dict(seed=3, num_train=12, num_val=4, image_size=(96, 80), max_objects=5)


def _digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            with open(osp.join(dirpath, name), 'rb') as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


def test_deterministic_from_seed(tmp_path):
    a, b, c = tmp_path / 'a', tmp_path / 'b', tmp_path / 'c'
    generate_synthetic_shapes(str(a), **SPEC)
    generate_synthetic_shapes(str(b), **SPEC)
    generate_synthetic_shapes(str(c), **{**SPEC, 'seed': 4})
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_valid_coco_with_boxes_inside_images(tmp_path):
    root = tmp_path / 'shapes'
    generate_synthetic_shapes(str(root), **{**SPEC, 'num_train': 40})
    coco = COCO(str(root / 'annotations' / 'train.json'))
    assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(SHAPE_CLASSES)
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) > 40
    areas = []
    for ann in anns:
        img = coco.loadImgs(ann['image_id'])[0]
        assert osp.exists(root / 'train' / img['file_name'])
        x, y, w, h = ann['bbox']
        assert w > 0 and h > 0
        assert x >= 0 and y >= 0 and x + w <= img['width'] and y + h <= img['height']
        mask = coco.annToMask(ann)
        assert mask.shape == (img['height'], img['width'])
        assert mask.sum() == ann['area']
        areas.append(ann['area'] / (img['width'] * img['height']))
    # objects from small to large, every class present
    assert min(areas) < 0.01 and max(areas) > 0.15
    assert {a['category_id'] for a in anns} == {1, 2, 3}


def test_regeneration_refuses_other_spec(tmp_path):
    root = str(tmp_path / 'shapes')
    generate_synthetic_shapes(root, **SPEC)
    with pytest.raises(ValueError, match='not the requested'):
        generate_synthetic_shapes(root, **{**SPEC, 'seed': 9})
    bad = tmp_path / 'not_shapes'
    bad.mkdir()
    (bad / 'something.txt').write_text('x')
    with pytest.raises(FileExistsError, match='not_shapes'):
        generate_synthetic_shapes(str(bad), **SPEC)
    with pytest.raises(ValueError, match='num_train'):
        generate_synthetic_shapes(str(tmp_path / 'x'), num_train=0)
    # nothing half-written is left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ['not_shapes', 'shapes']


def test_registered_dataset_loads_through_coco_pipeline(tmp_path):
    root = str(tmp_path / 'shapes') + '/'
    dataset = DATASETS.build(
        dict(type='SyntheticShapesDataset', data_root=root, spec=SPEC,
             ann_file='annotations/val.json', data_prefix=dict(img='val/'), test_mode=True,
             pipeline=[dict(type='LoadImageFromFile'),
                       dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
                       dict(type='PackDetInputs')]))
    assert len(dataset) == SPEC['num_val']
    sample = dataset[0]
    inputs, data_sample = sample['inputs'], sample['data_samples']
    h, w = inputs.shape[1:]
    assert h <= 80 and w <= 96
    boxes = data_sample.gt_instances.bboxes.tensor
    assert len(boxes) == len(data_sample.gt_instances.masks) > 0
    assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    with open(osp.join(root, 'spec.json')) as f:
        assert json.load(f)['seed'] == SPEC['seed']
    assert np.asarray(dataset.metainfo['classes']).tolist() == list(SHAPE_CLASSES)


def test_generated_folder_readable_by_other_users(tmp_path):
    old = os.umask(0o022)
    try:
        generate_synthetic_shapes(str(tmp_path / 'shapes'), **SPEC)
    finally:
        os.umask(old)
    for dirpath, dirnames, filenames in os.walk(tmp_path / 'shapes'):
        assert os.stat(dirpath).st_mode & 0o755 == 0o755, dirpath
        for name in filenames:
            assert os.stat(osp.join(dirpath, name)).st_mode & 0o044 == 0o044, name


def test_stale_temporary_folder_of_killed_run_is_cleaned(tmp_path):
    import subprocess
    import sys
    import time
    root = tmp_path / 'shapes'
    # a generation killed half-way (SIGKILL: no cleanup code runs) leaves its temp folder
    code = ('from mmdet_detrx.datasets import generate_synthetic_shapes; '
            f'generate_synthetic_shapes({str(root)!r}, num_train=100000, num_val=1)')
    proc = subprocess.Popen([sys.executable, '-c', code])
    deadline = time.time() + 120
    while not any(p.name.startswith('.synthetic-shapes-') and (p / 'train').exists()
                  for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.time() < deadline, 'generation did not start'
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    stale = [p for p in tmp_path.iterdir() if p.name.startswith('.synthetic-shapes-')]
    assert stale and not root.exists()
    unrelated = tmp_path / '.synthetic-shapes-not-ours'  # no marker file: left alone
    unrelated.mkdir()
    generate_synthetic_shapes(str(root), **SPEC)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['.synthetic-shapes-not-ours', 'shapes']
    assert not (root / '.detrx-synthetic-shapes-tmp').exists()


def test_data_root_that_cannot_be_created_is_a_clear_error(tmp_path):
    blocker = tmp_path / 'a_file'
    blocker.write_text('x')
    with pytest.raises(PermissionError, match='cannot create the synthetic-shapes data_root.*'
                       'a_file.*data_root=DIR'):
        generate_synthetic_shapes(str(blocker / 'sub' / 'shapes'), **SPEC)


def test_generation_logs_where_it_writes_and_when_done(tmp_path):
    """First use says where the dataset goes and when it is there; reuse says nothing."""
    from mmengine.logging import MMLogger
    lines = []
    logger = MMLogger.get_instance('test_generation_logs', log_level='INFO')
    logger.handlers[0].emit = lambda record: lines.append(record.getMessage())
    root = str(tmp_path / 'shapes')
    generate_synthetic_shapes(root, **SPEC)
    assert [line.split(':')[0] for line in lines] == ['synthetic shapes'] * 2
    assert f'into {root}' in lines[0] and lines[1].startswith(f'synthetic shapes: done, {root}')
    generate_synthetic_shapes(root, **SPEC)
    assert len(lines) == 2


@pytest.mark.parametrize('bad, match', [
    (dict(num_trian=2), "'num_trian' \\(did you mean 'num_train'\\?\\)"),
    (dict(min_visible=2.0), 'min_visible'),
    (dict(min_visible=float('nan')), 'min_visible'),
    (dict(num_val=2.5), 'num_val'),
    (dict(num_train=True), 'num_train'),
    (dict(image_size=(16, 16)), 'image_size'),
    (dict(image_size=(64, )), 'image_size'),
    (dict(seed=-1), 'seed'),
])
def test_spec_refuses_unknown_keys_and_out_of_range_values(tmp_path, bad, match):
    """Issue 27.5: typos and nonsensical values used to be accepted silently."""
    root = tmp_path / 'shapes'
    with pytest.raises((KeyError, ValueError), match=match):
        generate_synthetic_shapes(str(root), **{**SPEC, **bad})
    assert not root.exists() and os.listdir(tmp_path) == []  # nothing generated


def test_symlinked_data_root_is_generated_where_it_points(tmp_path):
    target = tmp_path / 'real'
    target.mkdir()
    link = tmp_path / 'link'
    link.symlink_to(target)
    generate_synthetic_shapes(str(link) + '/', **SPEC)
    assert osp.islink(link) and (target / 'spec.json').exists()
    assert generate_synthetic_shapes(str(link), **SPEC)['seed'] == SPEC['seed']  # reused
    parent_link = tmp_path / 'parent_link'
    parent_link.symlink_to(tmp_path)  # a symlinked parent folder
    generate_synthetic_shapes(str(parent_link / 'other'), **SPEC)
    assert (tmp_path / 'other' / 'spec.json').exists()


def test_dangling_symlink_data_root_fails_before_generating(tmp_path):
    link = tmp_path / 'link'
    link.symlink_to(tmp_path / 'missing')
    with pytest.raises(FileNotFoundError, match='symlink.*does not exist'):
        generate_synthetic_shapes(str(link) + '/', **SPEC)
    assert sorted(os.listdir(tmp_path)) == ['link']  # no temporary folder, nothing written
