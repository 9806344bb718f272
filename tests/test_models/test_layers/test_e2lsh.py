import pytest
import torch

from mmdet_detrx.models.layers import E2LSH


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
    (dict(dim=0), 'dim'),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        E2LSH(**kwargs)


def test_wrong_input_dim():
    with pytest.raises(ValueError, match='last dimension'):
        E2LSH(8)(torch.randn(3, 4))
