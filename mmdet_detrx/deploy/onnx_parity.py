"""Run an exported detector in ONNX Runtime and compare it with PyTorch on the same input.

Comparing detections position by position is fragile: two candidates whose scores differ by
less than the float32 rounding of the two runtimes may swap places in a top-k. The comparison
therefore checks, per image, that

* the sorted score vectors agree within ``score_atol`` (independent of ties), and
* there is a one-to-one matching of the detections (same label, score within ``score_atol``,
  every box coordinate within ``box_atol`` pixels) — found with a linear assignment.

When a top-k keeps fewer than all candidates, a tie exactly at its boundary can still change the
set; the tests export with ``max_per_img`` = all candidates so that the set is fixed.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from mmdet_detrx.models.layers import act_exact_mode
from mmdet_detrx.utils.optional_deps import import_optional
from .detection_export_wrapper import DetectionExportWrapper
from .onnx_export import INPUT_NAME

__all__ = ['ParityResult', 'compare_detections', 'onnxruntime_session', 'pytorch_detections',
           'run_onnxruntime']


@dataclass
class ParityResult:
    matched: bool
    max_score_diff: float  # sorted scores, per image
    max_box_diff: float  # over matched pairs, pixels
    num_unmatched: int
    num_detections: int

    def __str__(self) -> str:
        state = 'match' if self.matched else f'MISMATCH ({self.num_unmatched} unmatched)'
        return (f'{state}: {self.num_detections} detections, max |score diff| '
                f'{self.max_score_diff:.2e}, max |box diff| {self.max_box_diff:.2e} px')


def onnxruntime_session(onnx_file: str, threads: Optional[int] = None):
    """A CPU-EP ``InferenceSession`` (``threads``: intra-op threads, default ORT's)."""
    ort = import_optional('onnxruntime', 'deploy', 'Running an ONNX file in ONNX Runtime')
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(onnx_file, options, providers=['CPUExecutionProvider'])


def run_onnxruntime(session_or_file, inputs: torch.Tensor) -> Tuple[np.ndarray, np.ndarray]:
    session = (onnxruntime_session(session_or_file) if isinstance(session_or_file, str)
               else session_or_file)
    dets, labels = session.run(None, {INPUT_NAME: inputs.detach().cpu().numpy()})
    return dets, labels


def pytorch_detections(model: nn.Module, inputs: torch.Tensor) -> Tuple[np.ndarray, np.ndarray]:
    """The same ``(dets, labels)`` as the exported graph, computed by PyTorch (eager).

    ACT layers run in exact mode, as they are exported (see :mod:`.onnx_export`).
    """
    model.eval()
    with torch.no_grad(), act_exact_mode(model, True):
        dets, labels = DetectionExportWrapper(model)(inputs)
    return dets.numpy(), labels.numpy()


def compare_detections(expected: Tuple[np.ndarray, np.ndarray],
                       actual: Tuple[np.ndarray, np.ndarray],
                       score_atol: float = 1e-4,
                       box_atol: float = 1e-3) -> ParityResult:
    """Tie-robust comparison of two ``(dets (N, K, 5), labels (N, K))`` results."""
    (dets_e, labels_e), (dets_a, labels_a) = expected, actual
    if dets_e.shape != dets_a.shape or labels_e.shape != labels_a.shape:
        return ParityResult(False, float('inf'), float('inf'), dets_e.shape[1],
                            dets_e.shape[0] * dets_e.shape[1])
    max_score = max_box = 0.0
    unmatched = 0
    for image in range(dets_e.shape[0]):
        scores_e, scores_a = dets_e[image, :, 4], dets_a[image, :, 4]
        max_score = max(max_score, float(np.abs(np.sort(scores_e) - np.sort(scores_a)).max(
            initial=0.0)))
        box_diff = np.abs(dets_e[image, :, None, :4] - dets_a[image, None, :, :4]).max(-1)
        ok = ((labels_e[image, :, None] == labels_a[image, None, :])
              & (np.abs(scores_e[:, None] - scores_a[None, :]) <= score_atol)
              & (box_diff <= box_atol))  # (K, K): which pairs may be matched
        rows, cols = linear_sum_assignment(~ok)  # cost 0 for allowed pairs
        good = ok[rows, cols]
        unmatched += int((~good).sum())
        if good.any():
            max_box = max(max_box, float(box_diff[rows[good], cols[good]].max()))
    matched = unmatched == 0 and max_score <= score_atol
    return ParityResult(matched, max_score, max_box, unmatched,
                        dets_e.shape[0] * dets_e.shape[1])
