"""mmdet's ResNet with torchvision's (and timm's) dilation convention, for DETR-DC5 weights.

torchvision's ``replace_stride_with_dilation`` and timm's ``output_stride`` dilate a stage by
giving its blocks 1..n the new dilation while the *first* block keeps the previous stage's
dilation (its 3x3 conv has padding = dilation = previous); timm's BasicBlock also dilates its
second 3x3 conv. mmdet's ``ResLayer`` gives every block of the stage the new dilation, so a
DETR-DC5 checkpoint from facebookresearch/detr or HF transformers loads into mmdet's
``ResNet(dilations=(1, 1, 1, 2))`` but computes something else. :class:`TorchvisionResNet` builds
mmdet's ResNet and then sets those convs' dilation and padding as torchvision/timm do: the
parameter names and shapes are mmdet's, so everything else (configs, ``init_cfg``, frozen
stages) is unchanged; without dilation it *is* mmdet's ResNet.
"""
from mmdet.models.backbones import ResNet
from mmdet.models.backbones.resnet import BasicBlock
from mmdet.registry import MODELS

__all__ = ['TorchvisionResNet']


def _set_dilation(conv, dilation: int) -> None:
    conv.dilation = (dilation, dilation)
    conv.padding = (dilation, dilation)  # 3x3 convs: the output size stays the same


@MODELS.register_module()
class TorchvisionResNet(ResNet):
    """``ResNet`` whose dilated stages follow torchvision/timm (first block: previous dilation)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        previous = 1
        for stage_index, layer_name in enumerate(self.res_layers):
            dilation = self.dilations[stage_index]
            if dilation == previous == 1:
                continue
            for block_index, block in enumerate(getattr(self, layer_name)):
                first = previous if block_index == 0 else dilation
                if isinstance(self.block, type) and issubclass(self.block, BasicBlock):
                    _set_dilation(block.conv1, first)
                    _set_dilation(block.conv2, dilation)
                else:
                    _set_dilation(block.conv2, first)
            previous = dilation
