import pytest
import torch

from mmdet_detrx.models.layers import E2LSH, encode_bucket_index


def test_codes_follow_the_e2lsh_formula():
    lsh = E2LSH(dim=8, num_hashes=5, bucket_width=0.5, seed=3)
    x = torch.randn(2, 7, 8)
    codes = lsh(x)
    assert codes.shape == (2, 7, 5) and codes.dtype == torch.int64
    expected = torch.floor((x @ lsh.projections.t() + lsh.offsets) / 0.5).long()
    assert torch.equal(codes, expected)
    assert ((lsh.offsets >= 0) & (lsh.offsets < 0.5)).all()


def test_seed_determines_the_hash():
    a, b, c = E2LSH(16, 8, 1.0, seed=0), E2LSH(16, 8, 1.0, seed=0), E2LSH(16, 8, 1.0, seed=1)
    assert torch.equal(a.projections, b.projections) and torch.equal(a.offsets, b.offsets)
    assert not torch.equal(a.projections, c.projections)
    x = torch.randn(100, 16)
    assert torch.equal(a(x), b(x))


def test_fewer_rounds_are_a_prefix_of_more_rounds():
    x = torch.randn(100, 16)
    assert torch.equal(E2LSH(16, 8, 1.0, seed=4)(x), E2LSH(16, 32, 1.0, seed=4)(x)[:, :8])


def test_near_vectors_collide_more_than_far_ones():
    lsh = E2LSH(16, 1, bucket_width=1.0, seed=0)
    x = torch.randn(2000, 16)
    near = (lsh(x) == lsh(x + 0.01 * torch.randn_like(x))).float().mean()
    far = (lsh(x) == lsh(x + 3.0 * torch.randn_like(x))).float().mean()
    assert near > 0.95 and far < 0.5


def test_half_inputs_are_hashed_in_fp32():
    lsh = E2LSH(8, 4, 1.0)
    x = torch.randn(50, 8).to(torch.bfloat16)
    assert torch.equal(lsh(x), lsh(x.float()))


def test_state_dict_keeps_buffers_and_loads_without_them():
    lsh = E2LSH(8, 4, 1.0, seed=0)
    assert set(lsh.state_dict()) == {'projections', 'offsets'}
    other = E2LSH(8, 4, 1.0, seed=5)
    other.load_state_dict(lsh.state_dict(), strict=True)  # restores the saved hash
    assert torch.equal(other.projections, lsh.projections)
    fresh = E2LSH(8, 4, 1.0, seed=5)
    seeded = fresh.projections.clone()
    fresh.load_state_dict({}, strict=True)  # e.g. a checkpoint trained without ACT
    assert torch.equal(fresh.projections, seeded)
    with pytest.raises(RuntimeError, match='Unexpected'):
        fresh.load_state_dict({'foo': torch.zeros(1)}, strict=True)


@pytest.mark.parametrize('kwargs, name', [
    (dict(dim=8, num_hashes=0), 'num_hashes'),
    (dict(dim=8, bucket_width=0.0), 'bucket_width'),
    (dict(dim=8, bucket_width=-1.0), 'bucket_width'),
    (dict(dim=8, bucket_width=float('inf')), 'bucket_width'),
    (dict(dim=8, bucket_width=float('nan')), 'bucket_width'),
    (dict(dim=0), 'dim'),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        E2LSH(**kwargs)


def test_wrong_input_dim():
    with pytest.raises(ValueError, match='last dimension'):
        E2LSH(8)(torch.randn(3, 4))


def test_codes_encode_every_float64_index_monotonically_without_overflow():
    index = torch.tensor([-float('inf'), -1e300, -2.0**62, -2.0**62 + 1024, -3.0, -0.0, 0.0, 5.0,
                          2.0**62 - 1024, 2.0**62, 2.0**63, 1e300, float('inf')],
                         dtype=torch.float64)
    codes = encode_bucket_index(index)
    assert codes.dtype == torch.int64
    assert codes[5] == codes[6] == 0  # -0.0 and 0.0 are one bucket
    distinct = torch.cat([codes[:6], codes[7:]])
    assert (distinct[1:] > distinct[:-1]).all()  # strictly increasing: distinct, ordered
    small = index[3:9]
    assert torch.equal(encode_bucket_index(small), small.long())  # exact below 2**62


@pytest.mark.parametrize('width', [1e-20, 1e-120, 1e-290])
def test_narrow_buckets_keep_distinct_vectors_apart(width):
    x = torch.randn(64, 8)
    codes = E2LSH(8, 4, width)(x)
    assert torch.unique(codes, dim=0).shape[0] == 64
    assert torch.equal(codes[:10], E2LSH(8, 4, width)(x[:10]))  # codes are per vector


def test_huge_inputs_and_the_float64_limit():
    x = torch.full((3, 8), 3e38)  # fp32's largest values: fp32 projections overflow
    codes = E2LSH(8, 4, 1.0)(x * torch.tensor([[1.0], [0.5], [-1.0]]))
    assert torch.unique(codes, dim=0).shape[0] == 3
    with pytest.raises(ValueError, match='limit is bucket_width > '):
        E2LSH(8, 4, 1e-310)(torch.randn(5, 8))
    with pytest.raises(ValueError, match='non-finite'):
        E2LSH(8)(torch.tensor([[float('nan')] * 8]))


def test_change_width_and_rounds():
    lsh = E2LSH(8, 8, 2.0, seed=1)
    unit = lsh.unit_offsets().clone()
    lsh.set_bucket_width(0.5)
    torch.testing.assert_close(lsh.unit_offsets(), unit)
    x = torch.randn(30, 8)
    assert torch.equal(lsh(x), E2LSH(8, 8, 0.5, seed=1)(x))
    lsh.set_num_hashes(4)
    assert torch.equal(lsh(x), E2LSH(8, 4, 0.5, seed=1)(x))
    lsh.set_num_hashes(12)
    assert torch.equal(lsh(x), E2LSH(8, 12, 0.5, seed=1)(x))
    with pytest.raises(ValueError, match='bucket_width'):
        lsh.set_bucket_width(0.0)


def test_state_dict_with_other_rounds_loads_as_prefix():
    saved = E2LSH(8, 32, 1.0, seed=2)
    with torch.no_grad():
        saved.projections.mul_(-1)  # not what the seed draws: must be restored, not redrawn
    fewer, more = E2LSH(8, 16, 1.0, seed=2), E2LSH(8, 40, 1.0, seed=2)
    fewer.load_state_dict(saved.state_dict(), strict=True)
    more.load_state_dict(saved.state_dict(), strict=True)
    assert torch.equal(fewer.projections, saved.projections[:16])
    assert torch.equal(more.projections[:32], saved.projections)
    assert torch.equal(more.projections[32:], E2LSH(8, 40, 1.0, seed=2).projections[32:])
