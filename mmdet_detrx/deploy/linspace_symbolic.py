"""``torch.linspace`` for the TorchScript ONNX exporter, correct for ``steps == 1``.

torch's symbolic computes the step as ``(end - start) / (steps - 1)``: with one step that is
``0 / 0``, so the exported graph yields NaN where PyTorch yields ``[start]``. mmdet's DETRs call
``torch.linspace(0.5, H - 0.5, H)`` per feature level (encoder reference points, two-stage
proposals), and a level one pixel high or wide — the coarsest level of a small or elongated
image, e.g. 1 x 2 at stride 64 for a 64 x 80 input — then poisons every query that attends to
it. This symbolic divides by ``max(steps - 1, 1)`` instead; ``fixed_linspace_symbolic(opset)``
installs it for one export and restores torch's own afterwards.
"""
import contextlib
from typing import Iterator

import torch
from torch.onnx import symbolic_helper, symbolic_opset9

__all__ = ['fixed_linspace_symbolic']

_NAME = 'aten::linspace'
_ONNX_FLOAT = 1  # TensorProto.FLOAT


def _linspace(g, start, end, steps, dtype, layout, device, pin_memory):
    positions = symbolic_helper._arange_helper(g, steps, None)  # 0, 1, ..., steps - 1
    one = g.op('Constant', value_t=torch.tensor(1, dtype=torch.int64))
    intervals = g.op('Cast', symbolic_opset9.sub(g, steps, one), to_i=_ONNX_FLOAT)
    intervals = g.op('Max', intervals, g.op('Constant', value_t=torch.tensor(1.0)))
    step = symbolic_opset9.div(g, symbolic_opset9.sub(g, end, start), intervals)
    return symbolic_opset9.add(g, symbolic_opset9.mul(g, positions, step), start)


@contextlib.contextmanager
def fixed_linspace_symbolic(opset: int) -> Iterator[None]:
    torch.onnx.register_custom_op_symbolic(_NAME, _linspace, opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic(_NAME, opset)
