"""mmdet_detrx.models.detectors.detrx holds the ...X detectors, registered in mmdet's MODELS."""
from mmdet.registry import MODELS


def test_detectors_are_registered_from_their_module():
    from mmdet_detrx.models.detectors import detrx
    for name in ('DETRX', 'ConditionalDETRX', 'DeformableDETRX', 'DINOX'):
        assert MODELS.get(name) is getattr(detrx, name)


def test_predictions_are_float32_under_cpu_bf16_autocast():
    """`tools/test.py --amp` on CPU: the network runs in bf16, the predictions leave in float32
    (numpy, and so mmdet's CocoMetric, cannot read bf16 tensors)."""
    import torch
    from _helpers.detectors import demo_batch, tiny_detr_cfg

    import mmdet_detrx  # noqa: F401
    cfg = tiny_detr_cfg()
    cfg.type = 'DETRX'
    model = MODELS.build(cfg).eval()
    inputs, samples = demo_batch(model, [(3, 64, 80)], num_items=[2], num_classes=3,
                                 training=False)
    with torch.no_grad(), torch.autocast('cpu', torch.bfloat16):
        assert model.extract_feat(inputs)[0].dtype == torch.bfloat16  # autocast is active
        pred = model.predict(inputs, samples)[0].pred_instances
    assert pred.bboxes.dtype == pred.scores.dtype == torch.float32
    assert pred.labels.dtype == torch.int64
    pred.bboxes.numpy(), pred.scores.numpy()
