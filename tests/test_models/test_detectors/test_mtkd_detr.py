"""MTKDDETR: ACT and full branches with shared weights, box KD between them.

Models are mmdet's DETR config shrunk (ResNet-18, 2+2 layers of width 32, 10 queries, no
dropout) so that each test runs in a second or two on a CPU.
"""
import os.path as osp

import pytest
import torch
from _helpers import REPO_CONFIGS
from _helpers.detectors import build_detector, demo_batch
from _helpers.detectors import tiny_detr_cfg as _tiny_detr_cfg
from mmcv.cnn.bricks.transformer import MultiheadAttention
from mmdet.registry import MODELS
from mmengine.config import Config
from mmengine.runner import load_checkpoint

from mmdet_detrx.models.detectors import MTKDDETR
from mmdet_detrx.models.layers import AdaptiveClusteringAttention


def tiny_detr_cfg(model_type='MTKDDETR', act=True, num_queries=10, **extra):
    cfg = _tiny_detr_cfg(num_layers=2, num_queries=num_queries)
    cfg.update(type=model_type, **extra)
    if act:
        # Narrow buckets: several clusters per image, so ACT differs from exact attention
        # without collapsing to one prototype.
        cfg.encoder.layer_cfg.self_attn_cfg.update(
            type='AdaptiveClusteringAttention', num_hashes=4, bucket_width=0.5)
    return cfg


def batch(model, training=True):
    return demo_batch(model, [(3, 128, 96), (3, 96, 160)], num_items=[3, 2], num_classes=3,
                      training=training)


@pytest.fixture(scope='module')
def model():
    return build_detector(tiny_detr_cfg())


def test_loss_keys_and_weights(model):
    inputs, samples = batch(model)
    losses = model.loss(inputs, samples)
    for branch in ('act', 'full'):
        for key in ('loss_cls', 'loss_bbox', 'loss_iou', 'd0.loss_cls'):
            assert f'{branch}.{key}' in losses
    assert set(k for k in losses if 'kd' in k) == {'d0.loss_kd', 'loss_kd'}
    assert all('loss' in k for k in losses)  # mmengine sums exactly these
    assert losses['loss_kd'] > 0  # ACT really approximates here

    model.act_loss_weight, model.full_loss_weight = 0.5, 2.0
    try:
        scaled = model.loss(inputs, samples)
    finally:
        model.act_loss_weight = model.full_loss_weight = 1.0
    torch.testing.assert_close(scaled['act.loss_cls'], 0.5 * losses['act.loss_cls'])
    torch.testing.assert_close(scaled['full.loss_bbox'], 2.0 * losses['full.loss_bbox'])
    torch.testing.assert_close(scaled['loss_kd'], losses['loss_kd'])


def test_kd_is_zero_when_branches_agree(model, monkeypatch):
    """Exact limit: with ACT computing exact attention, the branches are the same network."""
    monkeypatch.setattr(AdaptiveClusteringAttention, 'forward', MultiheadAttention.forward)
    inputs, samples = batch(model)
    losses = model.loss(inputs, samples)
    assert losses['loss_kd'].item() == 0.0 and losses['d0.loss_kd'].item() == 0.0
    for key in ('loss_cls', 'loss_bbox', 'loss_iou'):
        assert torch.equal(losses[f'act.{key}'], losses[f'full.{key}'])


def test_kd_vanishes_in_the_single_query_cluster_limit():
    """Real ACT with buckets so narrow that each query is its own cluster: exact attention."""
    cfg = tiny_detr_cfg()
    cfg.encoder.layer_cfg.self_attn_cfg.bucket_width = 1e-6
    model = build_detector(cfg)
    inputs, samples = batch(model)
    losses = model.loss(inputs, samples)
    assert losses['loss_kd'].item() < 1e-9 and losses['d0.loss_kd'].item() < 1e-9
    torch.testing.assert_close(losses['act.loss_bbox'], losses['full.loss_bbox'])


def test_gradients_reach_shared_weights_from_both_branches(model):
    inputs, samples = batch(model)
    losses = model.loss(inputs, samples)
    shared = {
        # Not a residual-branch conv: zero_init_residual gives those a zero gradient at init.
        'backbone': model.backbone.layer4[0].downsample[0].weight,
        'encoder': model.encoder.layers[0].self_attn.attn.in_proj_weight,
        'decoder': model.decoder.layers[-1].cross_attn.attn.in_proj_weight,
        'queries': model.query_embedding.weight,
    }
    groups = {
        'act': sum(v for k, v in losses.items() if k.startswith('act.')),
        'full': sum(v for k, v in losses.items() if k.startswith('full.')),
        'kd': sum(v for k, v in losses.items() if 'loss_kd' in k),
    }
    for group, total in groups.items():
        grads = torch.autograd.grad(total, list(shared.values()), retain_graph=True,
                                    allow_unused=True)
        for (name, _), grad in zip(shared.items(), grads):
            assert grad is not None and grad.abs().sum() > 0, f'{group} -> {name}'


@pytest.mark.parametrize('detach_full', [True, False])
def test_detach_full_stops_kd_gradient_through_full_branch(model, detach_full, monkeypatch):
    seen = {}
    original = model.loss_kd.forward

    def spy(student, teacher):
        seen.setdefault('student', student.requires_grad)
        seen.setdefault('teacher', teacher.requires_grad)
        return original(student, teacher)

    monkeypatch.setattr(model.loss_kd, 'forward', spy)
    monkeypatch.setattr(model, 'detach_full', detach_full)
    model.loss(*batch(model))
    assert seen == {'student': True, 'teacher': not detach_full}


def test_predict_branches(model):
    model.eval()
    try:
        inputs, samples = batch(model, training=False)
        results = {}
        for branch in ('act', 'full', 'both'):
            model.test_branch = branch
            with torch.no_grad():
                results[branch] = model.predict(inputs, [s.clone() for s in samples])
    finally:
        model.test_branch = 'act'
        model.train()
    both = results['both'][0]
    torch.testing.assert_close(both.pred_instances.bboxes, results['act'][0].pred_instances.bboxes)
    torch.testing.assert_close(both.full_pred_instances.bboxes,
                               results['full'][0].pred_instances.bboxes)
    assert not torch.allclose(results['act'][0].pred_instances.bboxes,
                              results['full'][0].pred_instances.bboxes)
    assert 'full_pred_instances' not in results['act'][0]
    # The ACT modules are back to clustering after the full branch.
    assert not any(m.use_exact for m in model.modules()
                   if isinstance(m, AdaptiveClusteringAttention))


def test_strict_load_of_plain_detr_checkpoint(tmp_path):
    detr = build_detector(tiny_detr_cfg('DETR', act=False), seed=3).eval()
    path = str(tmp_path / 'detr.pth')
    torch.save({'state_dict': detr.state_dict(), 'meta': {}}, path)
    mtkd = build_detector(tiny_detr_cfg(test_branch='full'), seed=4).eval()
    load_checkpoint(mtkd, path, map_location='cpu', strict=True)
    inputs, samples = batch(detr, training=False)
    with torch.no_grad():
        expected = detr._forward(inputs, samples)
        got = mtkd._forward(inputs, samples)  # full branch = the DETR it was loaded from
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)


def test_bad_arguments():
    with pytest.raises(ValueError, match='AdaptiveClusteringAttention'):
        MODELS.build(tiny_detr_cfg(act=False))
    with pytest.raises(ValueError, match='test_branch'):
        MODELS.build(tiny_detr_cfg(test_branch='exact'))
    with pytest.raises(ValueError, match='act_loss_weight'):
        MODELS.build(tiny_detr_cfg(act_loss_weight=-1.0))
    assert isinstance(MODELS.build(tiny_detr_cfg()), MTKDDETR)


def test_both_branches_scored_under_distinct_prefixes(tmp_path):
    """test_branch='both' + CocoMetric(prefix='act') + BranchCocoMetric(prefix='full')."""
    import json

    from mmengine.evaluator import Evaluator

    boxes = {0: [[10, 10, 40, 40], [50, 20, 90, 70]], 1: [[5, 5, 60, 30]]}  # xyxy
    coco = dict(
        images=[dict(id=i, width=100, height=100, file_name=f'{i}.png') for i in boxes],
        categories=[dict(id=i + 1, name=n) for i, n in enumerate(('a', 'b', 'c'))],
        annotations=[dict(id=1 + 10 * i + j, image_id=i, category_id=1, iscrowd=0,
                          bbox=[x1, y1, x2 - x1, y2 - y1], area=(x2 - x1) * (y2 - y1))
                     for i, bs in boxes.items() for j, (x1, y1, x2, y2) in enumerate(bs)])
    ann_file = str(tmp_path / 'val.json')
    with open(ann_file, 'w') as f:
        json.dump(coco, f)

    def instances(bs, shift):
        bboxes = torch.tensor(bs, dtype=torch.float32) + shift
        return dict(bboxes=bboxes, scores=torch.ones(len(bs)),
                    labels=torch.zeros(len(bs), dtype=torch.long))

    evaluator = Evaluator([
        dict(type='CocoMetric', ann_file=ann_file, metric='bbox', prefix='act'),
        dict(type='BranchCocoMetric', pred_key='full_pred_instances', ann_file=ann_file,
             metric='bbox', prefix='full'),
    ])
    evaluator.dataset_meta = dict(classes=('a', 'b', 'c'))
    evaluator.process([dict(img_id=i, ori_shape=(100, 100),
                            pred_instances=instances(bs, 8.0),  # ACT: off by 8 px
                            full_pred_instances=instances(bs, 0.0))  # full: exact
                       for i, bs in boxes.items()])
    metrics = evaluator.evaluate(len(boxes))
    assert metrics['full/bbox_mAP'] == pytest.approx(1.0)
    assert metrics['act/bbox_mAP'] < 0.9

    with pytest.raises(KeyError, match="test_branch='both'"):
        evaluator.process([dict(img_id=0, ori_shape=(100, 100),
                                pred_instances=instances(boxes[0], 0.0))])


def tiny_conditional_detr_cfg(model_type, act=True):
    """The embedded-dataset Conditional DETR config with one encoder/decoder layer."""
    cfg = Config.fromfile(osp.join(
        REPO_CONFIGS, 'conditional_detr',
        'conditional-detrx_r18-dc5_1xb8-3000i_synthetic-shapes.py')).model
    cfg.type = model_type
    cfg.backbone.init_cfg = None  # random weights: no `make demo` checkpoint in a fresh clone
    cfg.encoder.num_layers = cfg.decoder.num_layers = 1
    if act:
        cfg.encoder.layer_cfg.self_attn_cfg.update(
            type='AdaptiveClusteringAttention', num_hashes=4, bucket_width=0.5)
    return cfg


def test_mtkd_around_conditional_detr(tmp_path):
    """MTKDMixin is generic: a plain mmdet ConditionalDETR checkpoint loads strictly into
    MTKDConditionalDETR, whose full branch reproduces it and whose loss has both branches."""
    plain = build_detector(tiny_conditional_detr_cfg('ConditionalDETR', act=False), seed=5).eval()
    path = str(tmp_path / 'conditional_detr.pth')
    torch.save({'state_dict': plain.state_dict(), 'meta': {}}, path)
    mtkd = build_detector(tiny_conditional_detr_cfg('MTKDConditionalDETR'), seed=6)
    load_checkpoint(mtkd, path, map_location='cpu', strict=True)
    inputs, samples = batch(plain, training=False)
    mtkd.eval()
    with torch.no_grad():
        expected = plain._forward(inputs, samples)
        mtkd.test_branch = 'full'
        torch.testing.assert_close(mtkd._forward(inputs, samples), expected)
        mtkd.test_branch = 'act'
        act_out = mtkd._forward(inputs, samples)
    assert not torch.allclose(act_out[1], expected[1])  # ACT is an approximation here

    mtkd.train()
    inputs, samples = batch(mtkd)
    losses = mtkd.loss(inputs, samples)
    assert {'act.loss_cls', 'full.loss_cls', 'act.loss_bbox', 'full.loss_iou',
            'loss_kd'} <= set(losses)
    total = sum(v for v in losses.values())
    total.backward()
    assert mtkd.encoder.layers[0].self_attn.attn.in_proj_weight.grad.abs().sum() > 0
