"""Exact Euclidean locality-sensitive hashing (E2LSH), the hash of ACT's query clustering.

Datar et al., "Locality-Sensitive Hashing Scheme Based on p-Stable Distributions", SoCG 2004;
used by Zheng, Gao et al., "End-to-End Object Detection with Adaptive Clustering Transformer",
BMVC 2021. Each of ``L = num_hashes`` rounds maps a vector ``x`` to the integer

    h_l(x) = floor((a_l . x + b_l) / r),    a_l ~ N(0, I),  b_l ~ U(0, r),

so vectors closer than ``r`` (in the direction ``a_l``) tend to share a code. Shapes:
``x (..., dim) -> codes (..., L)`` (int64).

The projections ``a (L, dim)`` and offsets ``b (L,)`` are buffers drawn once from ``seed``
(the official code redraws them every forward, which makes results irreproducible). They are
saved in checkpoints; a state dict without them (e.g. a plain DETR checkpoint) still loads
strictly, keeping the seeded values: see :meth:`E2LSH._load_from_state_dict`.

Codes never overflow: the bucket index ``(a_l . x + b_l) / r`` is computed in float64, and an
index beyond +-2**62 (very narrow buckets or huge inputs) is encoded by its IEEE-754 bit pattern
instead of being cast, which keeps codes distinct, ordered and inside int64 (see
:func:`encode_bucket_index`). Only an index that float64 itself cannot hold (``|a.x + b| / r``
above 1.8e308) is refused, with an error naming the smallest usable width.
"""
import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

__all__ = ['E2LSH', 'all_finite', 'encode_bucket_index']

_EXACT_CODE_LIMIT = 2.0**62
# Widths set_bucket_width accepts: u * r of float32 offsets (u >= 2**-24 when not 0) stays normal.
_WIDTH_RANGE = (1e-30, 1e30)
_FAST_INDEX_LIMIT = 2.0**22


def all_finite(x: Tensor) -> bool:
    """Whether ``x`` has no inf/nan: one min/max pass (nan propagates), cheaper than isfinite."""
    if x.numel() == 0:
        return True
    low, high = torch.aminmax(x.detach())
    return bool(torch.isfinite(low) & torch.isfinite(high))


def encode_bucket_index(index: Tensor) -> Tensor:
    """int64 codes of float64 bucket indices (integral values), without overflow.

    ``|index| < 2**62``: the index itself. Beyond: ``sign(index) * bits(|index|)``, the IEEE-754
    bit pattern of ``|index|`` read as an int64. For positive doubles the bit pattern grows with
    the value, and ``bits(2**62) > 2**62``, so the encoding is strictly increasing over every
    float64 value: distinct buckets keep distinct codes and their order.
    """
    if index.dtype != torch.float64:
        raise TypeError(f'index must be float64, got {index.dtype}')
    exact = index.abs() < _EXACT_CODE_LIMIT
    if bool(exact.all()):
        return index.to(torch.int64)
    magnitude = (index.abs() + 0.0).contiguous().view(torch.int64)  # -0.0 -> +0.0 first
    encoded = torch.where(index < 0, -magnitude, magnitude)
    return torch.where(exact, index.clamp(-_EXACT_CODE_LIMIT, _EXACT_CODE_LIMIT).to(torch.int64),
                       encoded)


class E2LSH(nn.Module):
    """Multi-round E2LSH with seeded, checkpointed hash parameters.

    Args:
        dim (int): Dimension of the hashed vectors.
        num_hashes (int): Number of hash rounds ``L``. Default: 32.
        bucket_width (float): Bucket width ``r``, in the units of the hashed vectors; finite and
            > 0. Default: 1.0.
        seed (int): Seed of the random projections and offsets. Default: 0.
    """

    def __init__(self, dim: int, num_hashes: int = 32, bucket_width: float = 1.0,
                 seed: int = 0) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f'dim must be a positive int, got {dim!r}')
        if not isinstance(num_hashes, int) or isinstance(num_hashes, bool) or num_hashes < 1:
            raise ValueError(f'num_hashes must be an int >= 1, got {num_hashes!r}')
        _check_width('bucket_width', bucket_width)
        self.dim = dim
        self.num_hashes = num_hashes
        self.bucket_width = float(bucket_width)
        self.seed = int(seed)
        projections, offsets = self._draw()
        self.register_buffer('projections', projections)  # (L, dim)
        self.register_buffer('offsets', offsets)  # (L,)

    def _draw(self, num_hashes: Optional[int] = None):
        # One generator per tensor, so the first L' rounds of an L-round hash are the L'-round
        # hash of the same seed: more rounds only ever split clusters further.
        num_hashes = self.num_hashes if num_hashes is None else num_hashes
        projections = torch.randn(num_hashes, self.dim,
                                  generator=torch.Generator().manual_seed(self.seed))
        offsets = torch.rand(num_hashes, generator=torch.Generator().manual_seed(self.seed))
        return projections, offsets * self.bucket_width

    def _offsets_for(self, bucket_width: float) -> Tensor:
        """The offsets ``b = (b / r) * bucket_width`` in the buffer's dtype, or ValueError if
        that dtype cannot hold them (the position in the bucket would be lost)."""
        _check_width('bucket_width', bucket_width)
        width = float(bucket_width)
        if not _WIDTH_RANGE[0] <= width <= _WIDTH_RANGE[1]:
            raise ValueError(f'bucket_width {width!r} is outside [{_WIDTH_RANGE[0]:g}, '
                             f'{_WIDTH_RANGE[1]:g}], the widths a hash module can be set to '
                             '(its float offsets b = u * r must neither underflow nor overflow)')
        unit = self.unit_offsets()  # float64, computed from the current state
        offsets = (unit * width).to(self.offsets.dtype)
        back = offsets.double() / width
        if not all_finite(offsets) or not torch.allclose(back, unit, rtol=1e-3, atol=0):
            raise ValueError(f'bucket_width {width!r} cannot be represented by this hash\'s '
                             f'{self.offsets.dtype} offsets b = u * r (they would underflow or '
                             'overflow); choose a width nearer 1')
        return offsets

    def set_bucket_width(self, bucket_width: float) -> None:
        """Change ``r``; the offsets keep their position inside the bucket (``b / r``).

        The width is checked (finite, > 0, within ``[1e-30, 1e30]`` and representable by the
        offsets' dtype) before anything changes: a refused width leaves the hash as it was.
        """
        offsets = self._offsets_for(bucket_width)
        self.offsets.copy_(offsets)
        self.bucket_width = float(bucket_width)

    def set_num_hashes(self, num_hashes: int) -> None:
        """Change ``L``, keeping the existing rounds (loaded or seeded) as the first ones."""
        if not isinstance(num_hashes, int) or isinstance(num_hashes, bool) or num_hashes < 1:
            raise ValueError(f'num_hashes must be an int >= 1, got {num_hashes!r}')
        projections, offsets = self._draw(num_hashes)
        keep = min(num_hashes, self.num_hashes)
        projections[:keep] = self.projections[:keep].cpu()
        offsets[:keep] = self.offsets[:keep].cpu()
        device = self.projections.device
        self.projections = projections.to(device)
        self.offsets = offsets.to(device)
        self.num_hashes = num_hashes

    def unit_offsets(self) -> Tensor:
        """(L,) float64 offsets as a fraction of the bucket, ``b / r`` in [0, 1)."""
        return self.offsets.double() / self.bucket_width

    def project(self, x: Tensor) -> Tensor:
        """``a . x``: ``x (..., dim) -> (..., L)``, without offsets.

        Runs in fp32 (fp64 inputs stay fp64) so that half-precision inputs under autocast are
        bucketed the same way as their fp32 originals would be, up to rounding; redone in fp64
        when fp32 overflows on huge (finite) inputs.
        """
        if x.shape[-1] != self.dim:
            raise ValueError(f'x must have last dimension {self.dim}, got shape {tuple(x.shape)}')
        compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.detach()
            projected = x.to(compute_dtype) @ self.projections.to(compute_dtype).t()
            if compute_dtype == torch.float32 and not all_finite(projected):
                projected = x.double() @ self.projections.double().t()
        return projected

    def bucket(self, projected: Tensor,
               bucket_width: Union[None, float, Tensor] = None) -> Tensor:
        """Codes ``floor((projected + b) / r)`` (int64) of projections from :meth:`project`.

        Args:
            projected (Tensor): (..., L) projections ``a . x`` (fp32 or fp64).
            bucket_width (float | Tensor, optional): ``r``; None for the module's own. A tensor
                broadcastable to ``projected`` gives each vector its own width (e.g. one per
                image and head); the offsets are then ``b / r_own * r``, the same place in the
                bucket.

        The index is computed in the projections' dtype when every index is below 2**22 in
        magnitude (fp32 represents those integers and their neighbourhood exactly enough); else
        again in float64, where no finite index overflows the int64 code.
        """
        with torch.autocast(device_type=projected.device.type, enabled=False):
            if projected.dtype != torch.float64:
                index = self._index(projected.float(), bucket_width, torch.float32)
                low, high = torch.aminmax(index)
                if bool((low > -_FAST_INDEX_LIMIT) & (high < _FAST_INDEX_LIMIT)):
                    return index.to(torch.int64)
            index = self._index(projected.double(), bucket_width, torch.float64)
            low, high = torch.aminmax(index)
            if not bool(torch.isfinite(low) & torch.isfinite(high)):
                self._raise_not_finite(projected, bucket_width)
            return encode_bucket_index(index)

    def _index(self, projected: Tensor, bucket_width, dtype) -> Tensor:
        if bucket_width is None:
            width = self.bucket_width
            shifted = projected + self.offsets.to(dtype)
        else:
            width = bucket_width.to(dtype) if isinstance(bucket_width, Tensor) else \
                float(bucket_width)
            shifted = projected + self.unit_offsets().to(dtype) * width
        return shifted.div_(width).floor_()

    def forward(self, x: Tensor) -> Tensor:
        """Hash ``x (..., dim)`` to integer codes ``(..., L)``."""
        if x.shape[-1] != self.dim:
            raise ValueError(f'x must have last dimension {self.dim}, got shape {tuple(x.shape)}')
        if not all_finite(x):
            raise ValueError('x contains non-finite values (inf/nan): they cannot be hashed')
        return self.bucket(self.project(x))

    def _raise_not_finite(self, projected: Tensor, bucket_width) -> None:
        projected = projected.double()
        if not all_finite(projected):
            raise ValueError('the projections a.x are not finite (non-finite or too large '
                             'input): they cannot be hashed')
        if bucket_width is None:
            width = torch.tensor(self.bucket_width, dtype=torch.float64)
        else:
            width = torch.as_tensor(bucket_width, dtype=torch.float64, device=projected.device)
        largest = float((projected.abs() + self.unit_offsets().to(projected.device) *
                         width).max())
        smallest = float(width.min())
        limit = largest / torch.finfo(torch.float64).max
        raise ValueError(
            f'bucket_width {smallest:.3g} is too small for these inputs: the bucket index '
            f'|a.x + b| / bucket_width overflows float64 (|a.x + b| reaches {largest:.3g}); '
            f'the limit is bucket_width > |a.x + b| / 1.8e308 = {limit:.3g}')

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A checkpoint trained without ACT (plain DETR) has no hash buffers: keep the ones drawn
        # from the seed instead of reporting them missing, so strict loading still works. A
        # checkpoint that has them restores them exactly.
        # A checkpoint hashed with another number of rounds L (same dim) loads as its first L
        # rounds, completed from the seed: what set_num_hashes does after loading.
        key_p, key_o = prefix + 'projections', prefix + 'offsets'
        saved = state_dict.get(key_p)
        if (isinstance(saved, Tensor) and saved.dim() == 2 and saved.shape[1] == self.dim
                and saved.shape[0] != self.num_hashes and key_o in state_dict
                and state_dict[key_o].shape == saved.shape[:1]):
            projections, offsets = self._draw()
            keep = min(self.num_hashes, saved.shape[0])
            projections[:keep] = saved[:keep].to(projections)
            offsets[:keep] = state_dict[key_o][:keep].to(offsets)
            state_dict[key_p], state_dict[key_o] = projections, offsets
        own_missing = []
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, own_missing,
                                      unexpected_keys, error_msgs)
        hash_keys = {prefix + 'projections', prefix + 'offsets'}
        missing_keys.extend(k for k in own_missing if k not in hash_keys)

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_hashes={self.num_hashes}, '
                f'bucket_width={self.bucket_width}, seed={self.seed}')


def _check_width(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or not value > 0:
        raise ValueError(f'{name} must be a finite number > 0, got {value!r}')
