import copy
import os.path as osp

import pytest
import torch
from mmcv.cnn.bricks.transformer import MultiheadAttention
from mmengine.config import Config
from mmengine.runner import load_checkpoint

from mmdet_detrx.models.layers import (E2LSH, AdaptiveClusteringAttention, act_exact_mode,
                                       adaptive_clustering_attention)

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
EMBED_DIMS, HEADS = 32, 4


def make_pair(batch_first=True, **act_kwargs):
    torch.manual_seed(0)
    exact = MultiheadAttention(EMBED_DIMS, HEADS, batch_first=batch_first).eval()
    act = AdaptiveClusteringAttention(EMBED_DIMS, HEADS, batch_first=batch_first,
                                      **act_kwargs).eval()
    act.load_state_dict(exact.state_dict(), strict=True)
    return exact, act


def make_inputs(batch=2, tokens=40, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, EMBED_DIMS, generator=g, dtype=dtype)
    pos = torch.randn(batch, tokens, EMBED_DIMS, generator=g, dtype=dtype)
    mask = torch.zeros(batch, tokens, dtype=torch.bool)
    mask[-1, tokens // 2:] = True
    mask[-1, 3] = True  # padding need not be at the end (DETR pads rows of a 2-D map)
    return x, pos, mask


def make_redundant_inputs(batch=2, tokens=40, seed=1):
    """Tokens drawn around 5 centres, as in a feature map with flat regions."""
    x, pos, mask = make_inputs(batch, tokens, seed=seed)
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(5, EMBED_DIMS, generator=g)
    x = centres[torch.randint(0, 5, (batch, tokens), generator=g)] + 0.01 * x
    return x, 0.01 * pos, mask


def self_attn(module, x, pos, mask):
    return module(query=x, key=x, value=x, query_pos=pos, key_pos=pos, key_padding_mask=mask)


@pytest.mark.parametrize('batch_first', [True, False])
def test_tiny_buckets_give_exact_attention(batch_first):
    exact, act = make_pair(batch_first=batch_first, bucket_width=1e-6)
    x, pos, mask = make_inputs()
    if not batch_first:
        x, pos = x.transpose(0, 1), pos.transpose(0, 1)
    out = self_attn(act, x, pos, mask)
    ref = self_attn(exact, x, pos, mask)
    real = ~mask if batch_first else ~mask.t()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=0)
    assert act.last_num_clusters.tolist() == [[40] * HEADS, [int((~mask[1]).sum())] * HEADS]


def test_use_exact_is_mmcv_attention_and_context_manager_restores():
    exact, act = make_pair()
    model = torch.nn.ModuleDict(dict(a=act, b=copy.deepcopy(act)))
    model['b'].use_exact = True
    x, pos, mask = make_inputs()
    with act_exact_mode(model):
        assert act.use_exact and model['b'].use_exact
        assert torch.equal(self_attn(act, x, pos, mask), self_attn(exact, x, pos, mask))
    assert not act.use_exact and model['b'].use_exact
    with pytest.raises(KeyError), act_exact_mode(model, enabled=True):
        raise KeyError
    assert not act.use_exact
    with act_exact_mode(model, enabled=False):
        assert not model['b'].use_exact
    assert model['b'].use_exact


def test_clusters_are_coarser_than_tokens_and_output_is_close():
    # Redundant tokens: 6 prototypes + small noise, as in a feature map with flat regions.
    exact, act = make_pair(bucket_width=1.0, record_clusters=True)
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(6, EMBED_DIMS, generator=g) * 3
    x = centres[torch.randint(0, 6, (1, 200), generator=g)]
    x = x + 0.01 * torch.randn(x.shape, generator=g)
    out, ref = act(x), exact(x)
    assert (act.last_num_clusters < 40).all()
    ids = act.last_cluster_ids
    assert ids.shape == (1, HEADS, 200)
    assert (ids.amax(-1) + 1).tolist() == act.last_num_clusters.tolist()
    assert (out - ref).norm() / (ref - x).norm() < 0.05


def test_image_in_padded_batch_equals_image_alone():
    _, act = make_pair(bucket_width=1.0)
    x, pos, mask = make_redundant_inputs()
    real = ~mask[1]
    x[1, ~real] = 1e3  # garbage in padding must not leak into clusters or keys
    batch_out = self_attn(act, x, pos, mask)[1, real]
    batch_clusters = act.last_num_clusters[1]
    alone = self_attn(act, x[1:, real], pos[1:, real], None)[0]
    torch.testing.assert_close(batch_out, alone, atol=1e-6, rtol=1e-5)
    assert torch.equal(act.last_num_clusters[0], batch_clusters)
    assert (batch_clusters < real.sum()).all()  # real clustering happened


def test_batch_equals_single_images():
    _, act = make_pair(bucket_width=1.0)
    x, pos, _ = make_redundant_inputs(batch=3)
    batch_out = act(x, query_pos=pos)
    for i in range(3):
        torch.testing.assert_close(batch_out[i:i + 1], act(x[i:i + 1], query_pos=pos[i:i + 1]),
                                   atol=1e-6, rtol=1e-5)


def test_deterministic_for_a_seed():
    x, pos, mask = make_redundant_inputs()
    _, act = make_pair(bucket_width=1.0, seed=7)
    _, same = make_pair(bucket_width=1.0, seed=7)
    _, other = make_pair(bucket_width=1.0, seed=8)
    out = self_attn(act, x, pos, mask)
    assert torch.equal(out, self_attn(act, x, pos, mask))
    assert torch.equal(out, self_attn(same, x, pos, mask))
    assert not torch.equal(out, self_attn(other, x, pos, mask))


def test_gradcheck_through_clustering_mean_and_broadcast():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g, dtype=torch.float64)
    q = centres[torch.randint(0, 3, (1, 2, 12), generator=g)]
    q = (q + 0.01 * torch.randn(q.shape, generator=g, dtype=torch.float64)).requires_grad_()
    k = torch.randn(1, 2, 12, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 12, 8, generator=g, dtype=torch.float64, requires_grad=True)
    lsh = E2LSH(8, num_hashes=4, bucket_width=2.0, seed=0)
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, -2:] = True
    _, ids, num = adaptive_clustering_attention(q, k, v, lsh, mask, mask)
    assert (num < 10).all()  # clusters with several members: the mean path is exercised

    def fn(q, k, v):
        return adaptive_clustering_attention(q, k, v, lsh, mask, mask)[0]

    # fast_mode checks the Jacobian along random directions: seconds instead of a minute.
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_training_steps_through_act():
    torch.manual_seed(0)
    act = AdaptiveClusteringAttention(EMBED_DIMS, HEADS, batch_first=True, bucket_width=1.0)
    head = torch.nn.Linear(EMBED_DIMS, 1)
    params = list(act.parameters()) + list(head.parameters())
    before = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=1e-2)
    x, pos, mask = make_inputs()
    target = torch.randn(2, 40, 1)
    losses = []
    for _ in range(15):
        out = head(self_attn(act, x, pos, mask))
        loss = ((out - target)[~mask]**2).mean()
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in params)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert act.attn.in_proj_weight.grad.abs().sum() > 0
    assert all(not torch.equal(a, b) for a, b in zip(before, params))


def test_zero_and_one_token():
    _, act = make_pair()
    out = act(torch.randn(2, 0, EMBED_DIMS))
    assert out.shape == (2, 0, EMBED_DIMS)
    exact, act = make_pair()
    x = torch.randn(2, 1, EMBED_DIMS)
    torch.testing.assert_close(act(x), exact(x))
    assert act.last_num_clusters.tolist() == [[1] * HEADS] * 2


def test_all_padded_image_is_finite_and_isolated():
    _, act = make_pair(bucket_width=1.0)
    x, pos, mask = make_inputs()
    mask[1] = True
    out = self_attn(act, x, pos, mask)
    assert torch.isfinite(out).all()
    assert act.last_num_clusters[1].tolist() == [0] * HEADS
    torch.testing.assert_close(out[:1], self_attn(act, x[:1], pos[:1], mask[:1]))
    mask[:] = True
    assert torch.isfinite(self_attn(act, x, pos, mask)).all()


def test_bad_input():
    for kwargs, name in [(dict(num_hashes=0), 'num_hashes'), (dict(bucket_width=0), 'bucket_width'),
                         (dict(bucket_width=-2.0), 'bucket_width')]:
        with pytest.raises(ValueError, match=name):
            AdaptiveClusteringAttention(EMBED_DIMS, HEADS, **kwargs)
    with pytest.raises(ValueError, match='num_heads'):
        AdaptiveClusteringAttention(30, 4)
    _, act = make_pair()
    x = torch.randn(1, 5, EMBED_DIMS)
    with pytest.raises(ValueError, match='attn_mask'):
        act(x, attn_mask=torch.zeros(5, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match='key_padding_mask'):
        act(x, key_padding_mask=torch.zeros(1, 5))
    with pytest.raises(ValueError, match='key_padding_mask'):
        act(x, key_padding_mask=torch.zeros(1, 4, dtype=torch.bool))
    x[0, 2, 0] = float('nan')
    with pytest.raises(ValueError, match='non-finite'):
        act(x)


def test_bf16_autocast_cpu():
    _, act = make_pair(bucket_width=1e-6)
    x, pos, mask = make_inputs()
    ref = self_attn(act, x, pos, mask)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = self_attn(act, x, pos, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float()[~mask], ref[~mask], atol=0.1, rtol=0.05)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_autocast_cuda(dtype):
    exact, act = make_pair(bucket_width=1.0)
    exact, act = exact.cuda(), act.cuda()
    x, pos, mask = (t.cuda() for t in make_inputs())
    ref = self_attn(act, x, pos, mask)
    with torch.autocast('cuda', dtype=dtype):
        out = self_attn(act, x, pos, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float()[~mask], ref[~mask], atol=0.05, rtol=0.05)
    # CUDA and CPU agree on clusters and output in fp32.
    cpu_out = self_attn(act.cpu(), *(t.cpu() for t in (x, pos, mask)))
    torch.testing.assert_close(ref.cpu(), cpu_out, atol=1e-5, rtol=1e-4)


def test_mmdet_detr_state_dict_loads_strictly(tmp_path):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    import mmdet
    detr_cfg = Config.fromfile(osp.join(osp.dirname(mmdet.__file__),
                                        '.mim/configs/detr/detr_r50_8xb2-150e_coco.py')).model
    detr_cfg.backbone.init_cfg = None
    act_cfg = Config.fromfile(osp.join(ROOT, 'configs/act_detr_r50.py')).model
    act_cfg.backbone.init_cfg = None
    detr = MODELS.build(detr_cfg)
    act_detr = MODELS.build(act_cfg)
    assert all(isinstance(layer.self_attn, AdaptiveClusteringAttention)
               for layer in act_detr.encoder.layers)
    act_detr.load_state_dict(detr.state_dict(), strict=True)
    ckpt = tmp_path / 'detr.pth'
    torch.save(dict(state_dict=detr.state_dict(), meta={}), ckpt)
    load_checkpoint(act_detr, str(ckpt), strict=True)
    for name, tensor in detr.state_dict().items():
        assert torch.equal(act_detr.state_dict()[name], tensor), name
    # An ACT checkpoint keeps its hash projections.
    extra = set(act_detr.state_dict()) - set(detr.state_dict())
    assert extra and all('.lsh.' in k for k in extra)
