"""TorchvisionResNet: mmdet's ResNet with torchvision/timm's dilation (DETR-DC5 weights)."""
import pytest
import torch
from mmdet.models.backbones import ResNet

from mmdet_detrx.models.backbones import TorchvisionResNet

timm = pytest.importorskip('timm')


@pytest.mark.parametrize('depth,output_stride', [(18, 16), (50, 16), (50, 8)])
def test_dilated_stages_equal_timm(depth, output_stride):
    strides, dilations = {16: ((1, 2, 2, 1), (1, 1, 1, 2)),
                          8: ((1, 2, 1, 1), (1, 1, 2, 4))}[output_stride]
    torch.manual_seed(0)
    reference = timm.create_model(f'resnet{depth}', pretrained=False, features_only=True,
                                  out_indices=(4, ), output_stride=output_stride).eval()
    ours = TorchvisionResNet(depth=depth, strides=strides, dilations=dilations,
                             out_indices=(3, ))
    ours.eval()  # mmdet's ResNet.train() returns None
    with torch.no_grad():  # timm zero-inits each block's last BatchNorm: undo, or the
        for name, tensor in reference.state_dict().items():  # residual branches vanish
            if name.endswith(('bn1.weight', 'bn2.weight', 'bn3.weight', 'running_var')):
                tensor.uniform_(0.5, 1.5)
            elif name.endswith(('bias', 'running_mean')):
                tensor.normal_(0, 0.1)
    state_dict = dict(reference.state_dict())
    missing, unexpected = ours.load_state_dict(state_dict, strict=False)
    assert not unexpected and all(k.endswith('num_batches_tracked') for k in missing)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = reference(x)[-1]
        got = ours(x)[-1]
        mmdet_way = ResNet(depth=depth, strides=strides, dilations=dilations, out_indices=(3, ))
        mmdet_way.load_state_dict(ours.state_dict())
        mmdet_way.eval()
        other = mmdet_way(x)[-1]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(other, expected, atol=1e-3)  # why the class exists


def test_undilated_is_mmdet_resnet():
    torch.manual_seed(0)
    ours, plain = TorchvisionResNet(depth=18), ResNet(depth=18)
    plain.load_state_dict(ours.state_dict())
    ours.eval()
    plain.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(ours(x), plain(x)):
            assert torch.equal(a, b)
