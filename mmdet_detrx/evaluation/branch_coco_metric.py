"""COCO metric over a second prediction field, e.g. the exact-attention branch of MTKDDETR."""
from typing import List

from mmdet.evaluation import CocoMetric
from mmdet.registry import METRICS

__all__ = ['BranchCocoMetric']


@METRICS.register_module()
class BranchCocoMetric(CocoMetric):
    """:class:`CocoMetric` over another prediction field than ``pred_instances``.

    With ``MTKDDETR(test_branch='both')`` a plain ``CocoMetric(prefix='act')`` scores the ACT
    branch and ``BranchCocoMetric(pred_key='full_pred_instances', prefix='full')`` the
    full-attention one, from the same forward pass.

    Args:
        pred_key (str): data-sample field holding the predictions to score.
        **kwargs: those of :class:`CocoMetric`.
    """

    def __init__(self, pred_key: str = 'full_pred_instances', **kwargs):
        super().__init__(**kwargs)
        if not isinstance(pred_key, str):
            raise TypeError(f'pred_key must be a str, got {type(pred_key).__name__}')
        self.pred_key = pred_key

    def process(self, data_batch: dict, data_samples: List[dict]) -> None:
        renamed = []
        for data_sample in data_samples:
            if self.pred_key not in data_sample:
                raise KeyError(f'data sample has no {self.pred_key!r} field (pred_key); with '
                               "MTKDDETR set model.test_branch='both'")
            renamed.append({**data_sample, 'pred_instances': data_sample[self.pred_key]})
        super().process(data_batch, renamed)
