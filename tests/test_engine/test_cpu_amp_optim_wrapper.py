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


@pytest.mark.skipif(torch.cuda.is_available(), reason='the CPU fallback (machines without GPUs)')
def test_amp_optim_wrapper_name_builds_bf16_wrapper_on_cpu():
    """What mmdet's own tools/train.py --amp asks for: type='AmpOptimWrapper', loss_scale."""
    from mmdet_detrx.engine import CPUAmpOptimWrapper
    model, wrapper = _wrapper_of_type('AmpOptimWrapper', loss_scale='dynamic')
    assert isinstance(wrapper, CPUAmpOptimWrapper)
    with wrapper.optim_context(model):
        assert model(torch.randn(2, 4)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match='dtype'):
        _wrapper_of_type('AmpOptimWrapper', dtype='float16')


def _wrapper_of_type(type_name, **kwargs):
    from mmengine.registry import DefaultScope
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with DefaultScope.overwrite_default_scope('mmdet'):
        from mmengine.registry import OPTIM_WRAPPERS as ROOT_OPTIM_WRAPPERS
        # the runner builds through mmengine's root registry in mmdet's scope
        return model, ROOT_OPTIM_WRAPPERS.build(
            dict(type=type_name, optimizer=optimizer, **kwargs))


def test_amp_decision_is_one_function():
    """What tools/train.py --amp and benchmark_detectors' bf16 training use (issue 28.5)."""
    from mmengine.config import ConfigDict

    from mmdet_detrx.engine.optimizers import amp_optim_wrapper_cfg
    cfg = ConfigDict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-4),
                     clip_grad=dict(max_norm=0.1))
    cpu = amp_optim_wrapper_cfg(cfg, device='cpu')
    assert (cpu.type, cpu.dtype, cpu.clip_grad) == ('CPUAmpOptimWrapper', 'bfloat16',
                                                    dict(max_norm=0.1))
    gpu = amp_optim_wrapper_cfg(cfg, device='cuda')
    assert (gpu.type, gpu.loss_scale) == ('AmpOptimWrapper', 'dynamic') and 'dtype' not in gpu
    assert amp_optim_wrapper_cfg(dict(cfg, loss_scale=512.), device='cuda')['loss_scale'] == 512.
    assert cfg.type == 'OptimWrapper' and 'dtype' not in cfg  # the config given is not changed
    if not torch.cuda.is_available():
        assert amp_optim_wrapper_cfg(cfg) == cpu  # decided by the machine
