"""Run a detector's convolutions in the channels-last (NHWC) memory layout.

mmdet hands its backbone an NCHW batch. On CPU, PyTorch's oneDNN convolutions then convert every
activation to a blocked layout and back; given an NHWC input they run on it directly and keep
their outputs NHWC, so the whole ResNet and neck stay channels-last. Measured in whole detectors
(``tools/analysis/benchmark_detectors.py --with-nchw``, 800x1333, batch 1, 2 threads, 2-core AMD
EPYC VM; docs/benchmarks.md): Deformable DETR's backbone 1.03 s -> 0.79 s in fp32, the whole
model 3-9% faster (Deformable DETR, DINO) and 20% (ACT-DETR-DC5, whose dilated c5 dominates).

Only the *input* is converted: parameters keep their layout, so state dicts, checkpoints and
strict loading are unchanged, and the outputs equal the NCHW ones up to float rounding (oneDNN
sums in another order). The transformer side is unaffected: ``flatten(2).transpose(1, 2)`` of an
NHWC feature map is already the contiguous ``(B, HW, C)`` token tensor.
"""
import torch

__all__ = ['ChannelsLastMixin', 'CONV_MEMORY_FORMATS']

CONV_MEMORY_FORMATS = ('auto', 'channels_last', 'contiguous')


class ChannelsLastMixin:
    """Put before an mmdet detector in the bases; adds ``conv_memory_format`` to its arguments.

    Args:
        conv_memory_format (str): layout of the batch given to the backbone.
            ``'auto'`` (default): channels-last on CPU, the input's own layout elsewhere (CUDA is
            left as mmdet runs it; no CUDA measurement of ours says otherwise).
            ``'channels_last'``: always. ``'contiguous'``: never (mmdet's behaviour).
    """

    def __init__(self, *args, conv_memory_format: str = 'auto', **kwargs):
        if conv_memory_format not in CONV_MEMORY_FORMATS:
            raise ValueError(f'conv_memory_format must be one of {CONV_MEMORY_FORMATS}, got '
                             f'{conv_memory_format!r}')
        super().__init__(*args, **kwargs)
        self.conv_memory_format = conv_memory_format

    def _channels_last(self, batch_inputs: torch.Tensor) -> bool:
        if batch_inputs.dim() != 4 or self.conv_memory_format == 'contiguous':
            return False
        return self.conv_memory_format == 'channels_last' or batch_inputs.device.type == 'cpu'

    def extract_feat(self, batch_inputs: torch.Tensor):
        if self._channels_last(batch_inputs):
            batch_inputs = batch_inputs.contiguous(memory_format=torch.channels_last)
        return super().extract_feat(batch_inputs)
