"""Forward-mode AD through the native op raises instead of returning zero tangents (issue 27.4).

torch routes an op registered with ``torch.library.register_autograd`` around its autograd
formula when no input requires grad, so a dual tensor's tangent was silently dropped. The
``grid_sample`` reference cannot do forward mode either (torch raises for ``grid_sampler_2d``).
"""
import pytest
import torch
import torch.autograd.forward_ad as forward_ad

from mmdet_detrx.ops import ms_deform_attn, native_available, use_pytorch_ms_deform_attn

pytestmark = pytest.mark.skipif(not native_available(), reason='native extension not built')


def _inputs():
    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[4, 5], [2, 3]])
    starts = torch.tensor([0, 20])
    value = torch.randn(1, 26, 2, 4, generator=g, dtype=torch.float64)
    locations = torch.rand(1, 3, 2, 2, 2, 2, generator=g, dtype=torch.float64)
    weights = torch.rand(1, 3, 2, 2, 2, generator=g, dtype=torch.float64)
    return value, shapes, starts, locations, weights


def test_jvp_through_native_op_raises():
    value, shapes, starts, locations, weights = _inputs()

    def f(v):
        return ms_deform_attn(v, shapes, starts, locations, weights)

    with pytest.raises(NotImplementedError, match='forward-mode AD'):
        torch.func.jvp(f, (value, ), (torch.ones_like(value), ))
    with forward_ad.dual_level(), pytest.raises(NotImplementedError, match='forward-mode AD'):
        ms_deform_attn(value, shapes, starts, forward_ad.make_dual(locations,
                                                                   torch.ones_like(locations)),
                       weights)
    assert f(value).shape == (1, 3, 8)  # outside forward mode nothing changed


def test_reference_refuses_forward_mode_too():
    """The grid_sample reference has no forward-mode formula in torch: it raises as well."""
    value, shapes, starts, locations, weights = _inputs()
    with use_pytorch_ms_deform_attn(), pytest.raises(NotImplementedError):
        torch.func.jvp(lambda v: ms_deform_attn(v, shapes, starts, locations, weights),
                       (value, ), (torch.ones_like(value), ))
