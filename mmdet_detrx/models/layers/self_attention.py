"""Multi-head self-attention over a token sequence, with one fused qkv projection.

Vaswani et al., "Attention Is All You Need" (https://arxiv.org/abs/1706.03762), in the form
ViT uses (https://arxiv.org/abs/2010.11929): ``qkv`` maps ``C -> 3C`` (q, k, v stacked in that
order, each split into heads), softmax(q kᵀ / sqrt(d)) v per head, then ``proj``. TNT's
attention (separate ``qk`` and ``v`` projections) is the same map with the two weights stacked.

Shapes: ``(B, N, C) -> (B, N, C)``.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['MultiheadSelfAttention']


class MultiheadSelfAttention(nn.Module):
    """Self-attention with parameters ``qkv`` (C -> 3C) and ``proj`` (C -> C).

    Args:
        embed_dims (int): token channels ``C``.
        num_heads (int): heads; must divide ``embed_dims``.
        qkv_bias (bool): bias in ``qkv``. Default: True.
        attn_drop (float): dropout on the attention weights (training only). Default: 0.
        proj_drop (float): dropout after ``proj``. Default: 0.
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 qkv_bias: bool = True,
                 attn_drop: float = 0.,
                 proj_drop: float = 0.):
        super().__init__()
        if not isinstance(num_heads, int) or num_heads <= 0 or embed_dims % num_heads:
            raise ValueError(f'embed_dims={embed_dims} must be divisible by '
                             f'num_heads={num_heads!r}')
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.head_dims = embed_dims // num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(embed_dims, embed_dims * 3, bias=qkv_bias)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, num_tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads, self.head_dims)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, d)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.)  # (B, heads, N, d)
        out = out.transpose(1, 2).reshape(batch, num_tokens, channels)  # (B, N, C)
        return self.proj_drop(self.proj(out))
