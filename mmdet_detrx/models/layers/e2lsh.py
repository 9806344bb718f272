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
"""
import torch
from torch import Tensor, nn

__all__ = ['E2LSH']


class E2LSH(nn.Module):
    """Multi-round E2LSH with seeded, checkpointed hash parameters.

    Args:
        dim (int): Dimension of the hashed vectors.
        num_hashes (int): Number of hash rounds ``L``. Default: 32.
        bucket_width (float): Bucket width ``r``, in the units of the hashed vectors.
            Default: 1.0.
        seed (int): Seed of the random projections and offsets. Default: 0.
    """

    def __init__(self, dim: int, num_hashes: int = 32, bucket_width: float = 1.0,
                 seed: int = 0) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f'dim must be a positive int, got {dim!r}')
        if not isinstance(num_hashes, int) or num_hashes < 1:
            raise ValueError(f'num_hashes must be an int >= 1, got {num_hashes!r}')
        if not bucket_width > 0:
            raise ValueError(f'bucket_width must be > 0, got {bucket_width!r}')
        self.dim = dim
        self.num_hashes = num_hashes
        self.bucket_width = float(bucket_width)
        self.seed = int(seed)
        projections, offsets = self._draw()
        self.register_buffer('projections', projections)  # (L, dim)
        self.register_buffer('offsets', offsets)  # (L,)

    def _draw(self):
        # One generator per tensor, so the first L' rounds of an L-round hash are the L'-round
        # hash of the same seed: more rounds only ever split clusters further.
        projections = torch.randn(self.num_hashes, self.dim,
                                  generator=torch.Generator().manual_seed(self.seed))
        offsets = torch.rand(self.num_hashes, generator=torch.Generator().manual_seed(self.seed))
        return projections, offsets * self.bucket_width

    def forward(self, x: Tensor) -> Tensor:
        """Hash ``x (..., dim)`` to integer codes ``(..., L)``.

        Hashing runs in fp32 (fp64 inputs stay fp64) so that half-precision inputs under
        autocast are bucketed the same way as their fp32 originals would be, up to rounding.
        """
        if x.shape[-1] != self.dim:
            raise ValueError(f'x must have last dimension {self.dim}, got shape {tuple(x.shape)}')
        compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.detach().to(compute_dtype)
            projected = x @ self.projections.to(compute_dtype).t()  # (..., L)
            projected = projected + self.offsets.to(compute_dtype)
            return torch.floor(projected / self.bucket_width).to(torch.int64)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A checkpoint trained without ACT (plain DETR) has no hash buffers: keep the ones drawn
        # from the seed instead of reporting them missing, so strict loading still works. A
        # checkpoint that has them restores them exactly.
        own_missing = []
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, own_missing,
                                      unexpected_keys, error_msgs)
        hash_keys = {prefix + 'projections', prefix + 'offsets'}
        missing_keys.extend(k for k in own_missing if k not in hash_keys)

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_hashes={self.num_hashes}, '
                f'bucket_width={self.bucket_width}, seed={self.seed}')
