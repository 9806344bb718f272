"""TNT's "visual word" embedding: each image patch becomes a sequence of sub-patch tokens.

Han et al., "Transformer in Transformer", NeurIPS 2021 (https://arxiv.org/abs/2103.00112),
sec. 3.2 as released (timm's ``tnt_s_patch16_224``): the image is cut into ``patch_size`` patches
(zero-padded at the bottom/right to whole patches); every patch goes through a 7x7 convolution
of stride ``inner_patch_size`` (padding 3), giving ``(patch_size / inner_patch_size)**2`` visual
words of ``inner_dims`` channels; a learned inner position embedding, shared by all patches, is
added.

Shapes: ``(B, 3, H, W) -> (B * Hp * Wp, P, Ci)`` and the grid ``(Hp, Wp)``, with
``Hp = ceil(H / patch_size)`` and ``P = (patch_size / inner_patch_size)**2``.
"""
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['PixelEmbed']


class PixelEmbed(nn.Module):
    """Patches -> visual words (sub-patch tokens) with an inner position embedding.

    Args:
        in_channels (int): image channels. Default: 3.
        inner_dims (int): channels ``Ci`` of a visual word.
        patch_size (int): side of a patch (outer token) in pixels. Default: 16.
        inner_patch_size (int): side of a visual word in pixels (the convolution stride);
            must divide ``patch_size``. Default: 4.
        kernel_size (int): the convolution's kernel (odd; padding ``kernel_size // 2``).
            Default: 7.
    """

    def __init__(self,
                 in_channels: int = 3,
                 inner_dims: int = 24,
                 patch_size: int = 16,
                 inner_patch_size: int = 4,
                 kernel_size: int = 7):
        super().__init__()
        for name, value in (('patch_size', patch_size), ('inner_patch_size', inner_patch_size),
                            ('inner_dims', inner_dims)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f'{name} must be a positive int, got {value!r}')
        if patch_size % inner_patch_size:
            raise ValueError(f'inner_patch_size={inner_patch_size} must divide '
                             f'patch_size={patch_size}')
        if kernel_size % 2 == 0:
            raise ValueError(f'kernel_size must be odd, got {kernel_size}')
        self.patch_size = patch_size
        self.inner_patch_size = inner_patch_size
        self.inner_dims = inner_dims
        self.words_per_side = patch_size // inner_patch_size
        self.num_words = self.words_per_side**2
        self.projection = nn.Conv2d(in_channels, inner_dims, kernel_size,
                                    stride=inner_patch_size, padding=kernel_size // 2)
        self.pos_embed = nn.Parameter(
            torch.zeros(1, inner_dims, self.words_per_side, self.words_per_side))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        batch, channels, height, width = x.shape
        p = self.patch_size
        pad_h, pad_w = -height % p, -width % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        grid_h, grid_w = (height + pad_h) // p, (width + pad_w) // p
        x = x.reshape(batch, channels, grid_h, p, grid_w, p)
        x = x.permute(0, 2, 4, 1, 3, 5).reshape(-1, channels, p, p)  # (B*Hp*Wp, 3, p, p)
        x = self.projection(x) + self.pos_embed  # (B*Hp*Wp, Ci, p/s, p/s)
        return x.flatten(2).transpose(1, 2), (grid_h, grid_w)  # (B*Hp*Wp, P, Ci)
