"""A DETR-family detector as ``image -> (dets, labels)``, the graph that ONNX export traces.

The forward is mmdet's own inference path: ``detector.predict(inputs, data_samples,
rescale=False)`` (backbone, neck, transformer, ``bbox_head.predict`` with its top-k and
cxcywh -> xyxy post-processing), with the data samples made from the input's own size, so that
a dynamic-shape export scales and clips boxes by the size of the image it is given.

Output convention (mmdeploy's)::

    input   (N, 3, H, W)  float32, the detector's data_preprocessor output (normalised, RGB/BGR
                          as the config says, no padding needed)
    dets    (N, K, 5)     x1, y1, x2, y2 in pixels of ``input``, then the score
    labels  (N, K)        int64 class index

``K`` is the head's ``test_cfg.max_per_img`` (or its number of queries). Boxes are in the
pixels of the network input; mapping them back to an original image that was resized is the
caller's job (divide by the resize scale), as in mmdeploy.
"""
from typing import Tuple

import torch
from mmdet.structures import DetDataSample
from torch import Tensor, nn

__all__ = ['DetectionExportWrapper']


class DetectionExportWrapper(nn.Module):
    """``forward(input) -> (dets, labels)`` around an mmdet DETR-family detector."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, inputs: Tensor) -> Tuple[Tensor, Tensor]:
        batch = inputs.shape[0]
        # Under the TorchScript tracer these sizes are traced values, so the boxes of a
        # dynamic-shape export are scaled and clipped by the size given at run time.
        height, width = inputs.shape[2], inputs.shape[3]
        data_samples = []
        for _ in range(batch):
            sample = DetDataSample()
            for key in ('img_shape', 'batch_input_shape', 'pad_shape'):
                # Not set_metainfo: it deep-copies, and a deep copy of a traced size is
                # exported as an uninitialised (zero) tensor instead of the size.
                sample.set_field((height, width), key, field_type='metainfo')
            data_samples.append(sample)
        results = self.detector.predict(inputs, data_samples, rescale=False)
        dets = torch.stack([
            torch.cat([r.pred_instances.bboxes, r.pred_instances.scores[:, None]], dim=1)
            for r in results])  # (N, K, 5)
        labels = torch.stack([r.pred_instances.labels for r in results])  # (N, K)
        return dets, labels
