"""Multi-scale deformable attention on our native op, a drop-in for mmcv's.

Deformable DETR: Deformable Transformers for End-to-End Object Detection (Zhu et al., ICLR 2021,
https://arxiv.org/abs/2010.04159), Eq. 3: each query looks at ``num_points`` sampled locations
around its reference point on each of ``num_levels`` feature maps, per head, and mixes the
bilinearly sampled values with softmax-normalised weights predicted from the query.

``MSDeformAttn`` subclasses ``mmcv.ops.MultiScaleDeformableAttention``: same constructor
arguments, forward signature and parameter names (``sampling_offsets``, ``attention_weights``,
``value_proj``, ``output_proj``), so mmdet's Deformable DETR / DINO checkpoints load strictly.
Only the forward differs: it always calls ``mmdet_detrx.ops.ms_deform_attn`` (our native kernel on
CPU and CUDA) where mmcv falls back to a ``grid_sample`` loop on CPU.

Shapes (``batch_first=True``; otherwise query/value/output are ``(N, B, C)``):
    query ``(B, Q, embed_dims)``, value ``(B, V, embed_dims)`` with ``V = sum(H_l * W_l)``,
    reference_points ``(B, Q, num_levels, 2)`` as normalised (x, y) or ``(B, Q, num_levels, 4)``
    as normalised (cx, cy, w, h), spatial_shapes ``(num_levels, 2)`` as (H_l, W_l),
    level_start_index ``(num_levels,)``, key_padding_mask ``(B, V)`` (True = padding);
    output ``(B, Q, embed_dims)``.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from mmcv.ops import MultiScaleDeformableAttention
from mmdet.registry import MODELS
from torch import Tensor

from mmdet_detrx.ops import ms_deform_attn
from .attention_inputs import attention_inputs

__all__ = ['MSDeformAttn']


@MODELS.register_module()
class MSDeformAttn(MultiScaleDeformableAttention):
    """mmcv's ``MultiScaleDeformableAttention`` computed by ``mmdet_detrx.ops.ms_deform_attn``.

    Args: see ``mmcv.ops.MultiScaleDeformableAttention`` (``embed_dims``, ``num_heads``,
    ``num_levels``, ``num_points``, ``im2col_step``, ``dropout``, ``batch_first``, ``norm_cfg``,
    ``init_cfg``, ``value_proj_ratio``). ``im2col_step`` is passed to the op, which validates
    it (> 0) and otherwise ignores it: every kernel covers the whole batch at once.

    Dtypes are the op's (``mmdet_detrx.ops.ms_deform_attn``, the one place that casts): under
    autocast the op runs in mixed precision, gathering bfloat16 / float16 values at float32
    sampling locations with float32 weights and float32 accumulation, and returns the autocast
    dtype; outside autocast it runs in the module's dtype. The locations stay float32 because a
    bfloat16 location is off by up to ~0.3 pixel on a 167-pixel-wide level (the widest level of
    an 800x1333 input).
    """

    def sampling_points(self, query: Tensor, reference_points: Tensor,
                        spatial_shapes: Tensor) -> Tuple[Tensor, Tensor]:
        """Where each query samples and with which weight.

        Args:
            query: ``(B, Q, embed_dims)``, batch first, positional embedding already added.
            reference_points: ``(B, Q, num_levels, 2 | 4)``, normalised to [0, 1].
            spatial_shapes: ``(num_levels, 2)`` as (H_l, W_l).

        Returns:
            sampling_locations ``(B, Q, heads, levels, points, 2)`` as normalised (x, y), and
            attention_weights ``(B, Q, heads, levels, points)`` summing to 1 per (query, head).
        """
        batch_size, num_queries, _ = query.shape
        shape = (batch_size, num_queries, self.num_heads, self.num_levels, self.num_points, 2)
        if reference_points.shape[-1] == 2:
            locations = self._locations_2d(query, reference_points, spatial_shapes)
        elif reference_points.shape[-1] == 4:
            # Offsets are relative to the reference box: half its size spread over the points.
            offsets = self.sampling_offsets(query).view(shape)
            # (B, Q, 1, levels, 1, 4) against offsets' (B, Q, heads, levels, points, 2)
            reference_points = reference_points[:, :, None, :, None]
            centers, sizes = reference_points[..., :2], reference_points[..., 2:]
            locations = centers + offsets / self.num_points * sizes * 0.5
        else:
            raise ValueError('reference_points must end in 2 (x, y) or 4 (cx, cy, w, h), got '
                             f'shape {tuple(reference_points.shape)}')

        # Softmax over all levels and points of a head, computed in the locations' dtype: the op
        # takes locations and weights in one dtype (float32 under autocast, where the bfloat16
        # logits would otherwise give bfloat16 weights).
        weights = self.attention_weights(query).view(
            batch_size, num_queries, self.num_heads, self.num_levels * self.num_points)
        weights = weights.softmax(-1, dtype=locations.dtype).view(
            batch_size, num_queries, self.num_heads, self.num_levels, self.num_points)
        return locations, weights

    def _locations_2d(self, query: Tensor, reference_points: Tensor,
                      spatial_shapes: Tensor) -> Tensor:
        """mmcv's ``reference_points + sampling_offsets(query) / (W_l, H_l)`` as two GEMMs.

        Returns ``(B, Q, heads, levels, points, 2)`` in the reference points' dtype (float32
        under autocast). The division is folded into the projection's weight and bias (one
        factor per output channel). Outside autocast the reference points are added by a GEMM
        with a 0/1 matrix that repeats each level's (x, y) over heads and points (exact: one
        rounding, as in the plain addition). Both replace broadcasting elementwise passes over
        the layer's largest tensor, 10-15 ms each per encoder layer at 800x1333 (2 threads).
        """
        proj = self.sampling_offsets
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        batch_size, num_queries, _ = query.shape
        # (levels, 2) as (1 / W, 1 / H), repeated over heads and points: one per output channel.
        inverse = 1.0 / spatial_shapes.flip(-1).to(proj.weight.dtype)
        scale = inverse[None, :, None, :].expand(heads, levels, points, 2).reshape(-1)
        bias = proj.bias * scale if proj.bias is not None else None
        offsets = F.linear(query, proj.weight * scale[:, None], bias)
        shape = (batch_size, num_queries, heads, levels, points, 2)
        if offsets.dtype != reference_points.dtype:
            # Autocast: bf16/fp16 offsets. One promoting addition gives fp32 locations (measured
            # faster here than converting the offsets to fp32 for the GEMM below).
            return reference_points[:, :, None, :, None] + offsets.view(shape)
        reference = reference_points.expand(batch_size, num_queries, levels, 2).reshape(
            batch_size * num_queries, levels * 2)  # expand: mmcv broadcasts size-1 dims too
        expand = torch.eye(levels * 2, dtype=reference.dtype, device=reference.device)
        expand = expand.view(levels * 2, 1, levels, 1, 2).expand(
            -1, heads, -1, points, -1).reshape(levels * 2, -1)
        return offsets.view(batch_size * num_queries, -1).addmm_(reference, expand).view(shape)

    def forward(self,
                query: Tensor,
                key: Optional[Tensor] = None,
                value: Optional[Tensor] = None,
                identity: Optional[Tensor] = None,
                query_pos: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None,
                reference_points: Optional[Tensor] = None,
                spatial_shapes: Optional[Tensor] = None,
                level_start_index: Optional[Tensor] = None,
                **kwargs) -> Tensor:
        """Same call as ``MultiScaleDeformableAttention.forward``; ``key`` is unused (as there)."""
        if reference_points is None or spatial_shapes is None or level_start_index is None:
            raise ValueError('MSDeformAttn needs reference_points, spatial_shapes and '
                             'level_start_index')
        query, _, value, identity = attention_inputs(
            query, value=value, identity=identity, query_pos=query_pos,
            batch_first=self.batch_first, uses_key=False)  # (B, N, C), mmcv's defaults

        # The op itself checks that spatial_shapes cover value, before any kernel runs.
        batch_size, num_values, _ = value.shape
        # In place on fresh outputs of our own projections (as below): their backward needs
        # only their inputs, and at 800x1333 each copy saved is a ~22 MiB tensor per layer.
        value = self.value_proj(value)
        if key_padding_mask is not None:
            value.masked_fill_(key_padding_mask[..., None], 0.0)
        value = value.view(batch_size, num_values, self.num_heads, -1)  # (B, V, heads, C)

        locations, weights = self.sampling_points(query, reference_points, spatial_shapes)

        output = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights,
                                self.im2col_step)  # (B, Q, heads * C), value's dtype
        output = self.output_proj(output)

        if not self.batch_first:
            output = output.transpose(0, 1)  # (Q, B, C)
        dropped = self.dropout(output)
        if dropped is output:  # eval, or p = 0: no new tensor needed for the residual
            return dropped.add_(identity)
        return dropped + identity
