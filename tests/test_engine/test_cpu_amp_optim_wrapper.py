import pytest
import torch
from mmdet.registry import OPTIM_WRAPPERS

import mmdet_detrx  # noqa: F401


def _wrapper(**kwargs):
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, OPTIM_WRAPPERS.build(
        dict(type='CPUAmpOptimWrapper', optimizer=optimizer, **kwargs))


def test_forward_runs_in_bf16_and_step_updates_fp32_params():
    model, wrapper = _wrapper()
    before = model.weight.detach().clone()
    with wrapper.optim_context(model):
        out = model(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16
    wrapper.update_params(out.float().sum())
    assert model.weight.dtype == torch.float32
    assert not torch.equal(model.weight, before)
    with torch.no_grad():  # outside the context nothing is cast
        assert model(torch.randn(2, 4)).dtype == torch.float32


def test_rejects_unknown_dtype():
    with pytest.raises(ValueError, match='dtype'):
        _wrapper(dtype='int8')
