import copy
import os.path as osp
import weakref

import pytest
import torch
from mmcv.cnn.bricks.transformer import MultiheadAttention
from mmengine.config import Config
from mmengine.runner import load_checkpoint

from mmdet_detrx.models.layers import (E2LSH, AdaptiveClusteringAttention, act_exact_mode,
                                       adaptive_clustering_attention, cluster_queries,
                                       record_act_forwards)
from mmdet_detrx.utils.complexity import act_flops

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
EMBED_DIMS, HEADS = 32, 4


_LAST_FORWARD = weakref.WeakKeyDictionary()


def last(act):
    """The ACTForward record of ``act``'s last forward (its record hook, see make_pair)."""
    return _LAST_FORWARD[act]


def make_pair(batch_first=True, **act_kwargs):
    torch.manual_seed(0)
    exact = MultiheadAttention(EMBED_DIMS, HEADS, batch_first=batch_first).eval()
    act = AdaptiveClusteringAttention(EMBED_DIMS, HEADS, batch_first=batch_first,
                                      **act_kwargs).eval()
    act.load_state_dict(exact.state_dict(), strict=True)
    act.register_record_hook(_LAST_FORWARD.__setitem__)
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


def assert_tiny_width_gives_exact_attention(batch_first, **width):
    """Buckets far narrower than the queries' spacing: one cluster per real token, so ACT is
    mmcv's attention on the real tokens."""
    exact, act = make_pair(batch_first=batch_first, **width)
    x, pos, mask = make_inputs()
    if not batch_first:
        x, pos = x.transpose(0, 1), pos.transpose(0, 1)
    out, ref = self_attn(act, x, pos, mask), self_attn(exact, x, pos, mask)
    real = ~mask if batch_first else ~mask.t()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=0)
    assert last(act).num_clusters.tolist() == [[40] * HEADS, [int((~mask[1]).sum())] * HEADS]


@pytest.mark.parametrize('batch_first', [True, False])
def test_tiny_buckets_give_exact_attention(batch_first):
    assert_tiny_width_gives_exact_attention(batch_first, bucket_width=1e-6)


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
    exact, act = make_pair(bucket_width=1.0)
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(6, EMBED_DIMS, generator=g) * 3
    x = centres[torch.randint(0, 6, (1, 200), generator=g)]
    x = x + 0.01 * torch.randn(x.shape, generator=g)
    out, ref = act(x), exact(x)
    assert (last(act).num_clusters < 40).all()
    ids = last(act).cluster_ids
    assert ids.shape == (1, HEADS, 200)
    assert (ids.amax(-1) + 1).tolist() == last(act).num_clusters.tolist()
    assert (out - ref).norm() / (ref - x).norm() < 0.05


def test_image_in_padded_batch_equals_image_alone():
    _, act = make_pair(bucket_width=1.0)
    x, pos, mask = make_redundant_inputs()
    real = ~mask[1]
    x[1, ~real] = 1e3  # garbage in padding must not leak into clusters or keys
    batch_out = self_attn(act, x, pos, mask)[1, real]
    batch_clusters = last(act).num_clusters[1]
    alone = self_attn(act, x[1:, real], pos[1:, real], None)[0]
    torch.testing.assert_close(batch_out, alone, atol=1e-6, rtol=1e-5)
    assert torch.equal(last(act).num_clusters[0], batch_clusters)
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


def test_cluster_queries_groups_equal_codes_per_image_and_head():
    codes = torch.tensor([[[[1, 2], [1, 2], [3, 0], [1, 2]]],
                          [[[5, 5], [0, 0], [5, 5], [0, 0]]]])  # (B=2, heads=1, N=4, L=2)
    mask = torch.tensor([[False] * 4, [False, False, False, True]])
    clusters = cluster_queries(codes, mask)
    # Numbered in code order within each image; the padded query joins no real cluster.
    assert clusters.ids.tolist() == [[[0, 0, 1, 0]], [[1, 0, 1, -1]]]
    assert clusters.num_real.tolist() == [[2], [2]]
    assert clusters.max_clusters == 3  # image 1: two real clusters and one of padding
    assert clusters.slot.tolist() == [0, 0, 1, 0, 4, 3, 4, 5]
    unmasked = cluster_queries(codes)
    assert unmasked.ids.tolist() == [[[0, 0, 1, 0]], [[1, 0, 1, 0]]]
    assert unmasked.max_clusters == 2


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
    _, ids, num, _ = adaptive_clustering_attention(q, k, v, lsh, mask, mask)
    assert (num < 10).all()  # clusters with several members: the mean path is exercised

    def fn(q, k, v):
        return adaptive_clustering_attention(q, k, v, lsh, mask, mask).output

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
    assert last(act).num_clusters.tolist() == [[1] * HEADS] * 2


def test_all_padded_image_is_finite_and_isolated():
    _, act = make_pair(bucket_width=1.0)
    x, pos, mask = make_inputs()
    mask[1] = True
    out = self_attn(act, x, pos, mask)
    assert torch.isfinite(out).all()
    assert last(act).num_clusters[1].tolist() == [0] * HEADS
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


# --- Scale-free (relative) bucket width --------------------------------------------------------

def scale_query_projection(module, factor):
    """The same attention with its per-head queries q multiplied by ``factor``."""
    embed = module.embed_dims
    with torch.no_grad():
        module.attn.in_proj_weight[:embed] *= factor
        module.attn.in_proj_bias[:embed] *= factor
    return module


@pytest.mark.parametrize('factor', [2.0**-6, 2.0**5, 10.0, 1e3])
def test_relative_width_clusters_do_not_change_with_the_query_scale(factor):
    x, pos, mask = make_redundant_inputs()
    _, act = make_pair(relative_bucket_width=0.5)
    _, scaled = make_pair(relative_bucket_width=0.5)
    scale_query_projection(scaled, factor)
    self_attn(act, x, pos, mask)
    self_attn(scaled, x, pos, mask)
    assert torch.equal(last(act).cluster_ids, last(scaled).cluster_ids)
    assert (last(act).num_clusters > 1).all() and (last(act).num_clusters < 20).all()
    torch.testing.assert_close(last(scaled).bucket_widths, factor * last(act).bucket_widths)
    # The absolute width is not scale-free: the same factor changes the clusters.
    _, absolute = make_pair(bucket_width=last(act).bucket_widths.median().item())
    _, absolute_scaled = make_pair(bucket_width=last(act).bucket_widths.median().item())
    scale_query_projection(absolute_scaled, factor)
    self_attn(absolute, x, pos, mask)
    self_attn(absolute_scaled, x, pos, mask)
    assert not torch.equal(last(absolute).num_clusters, last(absolute_scaled).num_clusters)


def test_relative_width_ignores_a_shift_of_the_queries():
    g = torch.Generator().manual_seed(0)
    q = 3 * torch.randn(2, HEADS, 30, EMBED_DIMS // HEADS, generator=g)
    k, v = torch.randn_like(q), torch.randn_like(q)
    lsh = E2LSH(EMBED_DIMS // HEADS, 16, 1.0, seed=0)
    _, ids, num, _ = adaptive_clustering_attention(q, k, v, lsh, relative_bucket_width=0.7)
    _, shifted_ids, _, _ = adaptive_clustering_attention(q + 64.0, k, v, lsh,
                                                         relative_bucket_width=0.7)
    assert torch.equal(ids, shifted_ids) and (num > 1).all()


@pytest.mark.parametrize('batch_first', [True, False])
def test_tiny_relative_width_gives_exact_attention(batch_first):
    assert_tiny_width_gives_exact_attention(batch_first, relative_bucket_width=1e-7)


def test_relative_width_padding_batch_and_determinism():
    _, act = make_pair(relative_bucket_width=0.5, seed=3)
    x, pos, mask = make_redundant_inputs(batch=3)
    mask[2] = mask[1]
    real = ~mask[1]
    x[1, ~real] = 1e3  # garbage in padding must not move the spread, clusters or keys
    batch_out = self_attn(act, x, pos, mask)
    clusters, widths = last(act).num_clusters.clone(), last(act).bucket_widths.clone()
    assert (clusters[1] > 1).all() and (clusters[1] < real.sum()).all()
    alone = self_attn(act, x[1:2, real], pos[1:2, real], None)
    torch.testing.assert_close(batch_out[1, real], alone[0], atol=1e-6, rtol=1e-5)
    assert torch.equal(last(act).num_clusters[0], clusters[1])
    torch.testing.assert_close(last(act).bucket_widths[0], widths[1], rtol=1e-12, atol=0)
    for i in range(3):  # each image of the batch as if alone
        single = self_attn(act, x[i:i + 1], pos[i:i + 1], mask[i:i + 1])
        torch.testing.assert_close(batch_out[i:i + 1][~mask[i:i + 1]], single[~mask[i:i + 1]],
                                   atol=1e-6, rtol=1e-5)
    _, same = make_pair(relative_bucket_width=0.5, seed=3)
    assert torch.equal(batch_out, self_attn(same, x, pos, mask))
    assert torch.equal(batch_out, self_attn(act, x, pos, mask))


def test_relative_width_all_padded_image_and_constant_queries():
    _, act = make_pair(relative_bucket_width=0.5)
    x, pos, mask = make_inputs()
    mask[1] = True
    out = self_attn(act, x, pos, mask)
    assert torch.isfinite(out).all() and last(act).num_clusters[1].tolist() == [0] * HEADS
    for value in (0.0, 1.0, 1e4):  # zero or rounding-noise spread: one cluster, finite output
        same = torch.full((2, 6, EMBED_DIMS), value)
        assert torch.isfinite(act(same)).all()
        assert last(act).num_clusters.tolist() == [[1] * HEADS] * 2


def test_relative_width_bad_input():
    for value in [0.0, -1.0, float('nan'), float('inf'), True, '1']:
        with pytest.raises(ValueError, match='relative_bucket_width'):
            AdaptiveClusteringAttention(EMBED_DIMS, HEADS, relative_bucket_width=value)
    for value in [float('inf'), float('nan')]:
        with pytest.raises(ValueError, match='bucket_width'):
            AdaptiveClusteringAttention(EMBED_DIMS, HEADS, bucket_width=value)
    _, act = make_pair()
    with pytest.raises(ValueError, match='relative_bucket_width'):
        act.relative_bucket_width = -0.5
    act.relative_bucket_width = 0.25
    assert act.relative_bucket_width == 0.25
    act.relative_bucket_width = None  # back to the absolute width
    assert act.relative_bucket_width is None


# --- Per-layer settings ------------------------------------------------------------------------

def test_per_layer_lists_select_by_layer_index():
    act = AdaptiveClusteringAttention(EMBED_DIMS, HEADS, num_hashes=[8, 16, 24],
                                      bucket_width=[4.0, 2.0, 1.0],
                                      relative_bucket_width=[None, 0.5, None], layer_index=1)
    assert (act.num_hashes, act.bucket_width, act.relative_bucket_width) == (16, 2.0, 0.5)
    assert act.lsh.projections.shape[0] == 16
    act.select_layer(2, num_layers=3)
    assert (act.num_hashes, act.bucket_width, act.relative_bucket_width) == (24, 1.0, None)
    with pytest.raises(ValueError, match='has 3 per-layer values .* 6 layers'):
        act.select_layer(0, num_layers=6)
    assert act.layer_index == 2 and act.num_hashes == 24  # a refused selection changes nothing
    with pytest.raises(ValueError, match='out of range'):
        AdaptiveClusteringAttention(EMBED_DIMS, HEADS, bucket_width=[1.0, 2.0], layer_index=2)
    unresolved = AdaptiveClusteringAttention(EMBED_DIMS, HEADS, bucket_width=[1.0, 2.0])
    with pytest.raises(RuntimeError, match='resolve_act_layers'):
        unresolved(torch.randn(1, 4, EMBED_DIMS))
    for kwargs, name in [(dict(bucket_width=[]), 'bucket_width'),
                         (dict(bucket_width=[1.0, -1.0]), 'bucket_width'),
                         (dict(relative_bucket_width=[0.5, float('nan')]), 'relative_bucket_width'),
                         (dict(num_hashes=[8, 0]), 'num_hashes')]:
        with pytest.raises(ValueError, match=name):
            AdaptiveClusteringAttention(EMBED_DIMS, HEADS, **kwargs)


def build_act_detr(**attn_cfg):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg = Config.fromfile(osp.join(ROOT, 'configs/act/act-detr_r18-dc5_1xb8-3000i_synthetic-'
                                   'shapes.py')).model
    cfg.backbone.init_cfg = None
    cfg.encoder.layer_cfg.self_attn_cfg.update(attn_cfg)
    return MODELS.build(cfg)


def test_per_layer_settings_from_the_config_reach_their_layers():
    from mmdet_detrx.models.layers import resolve_act_layers
    model = build_act_detr(bucket_width=[8.0, 4.0, 2.0], num_hashes=[32, 24, 16],
                           relative_bucket_width=[None, None, 0.25])
    # DETRX picks each layer's entry when it builds the attentions (tools need no extra call).
    assert [(layer.self_attn.layer_index, layer.self_attn.bucket_width)
            for layer in model.encoder.layers] == [(0, 8.0), (1, 4.0), (2, 2.0)]
    found = resolve_act_layers(model)
    assert found == [layer.self_attn for layer in model.encoder.layers]
    assert [(a.layer_index, a.bucket_width, a.num_hashes, a.relative_bucket_width)
            for a in found] == [(0, 8.0, 32, None), (1, 4.0, 24, None), (2, 2.0, 16, 0.25)]
    assert resolve_act_layers(model) == found  # idempotent
    # Keys are unchanged; a checkpoint hashed with L = 32 everywhere loads into L = 24 / 16.
    plain = build_act_detr()
    model.load_state_dict(plain.state_dict(), strict=True)
    saved = plain.encoder.layers[2].self_attn.lsh.projections
    assert torch.equal(found[2].lsh.projections, saved[:16])
    x = torch.randn(2, 12, 128)
    with record_act_forwards(model) as forwards:
        model.encoder(query=x, query_pos=torch.zeros_like(x), key_padding_mask=None)
    assert [len(records) for records in forwards.values()] == [1, 1, 1]
    assert all(records[0].num_clusters is not None for records in forwards.values())
    with pytest.raises(ValueError, match='bucket_width has 2 per-layer values .* 3 layers'):
        resolve_act_layers(build_act_detr(bucket_width=[8.0, 4.0]))


# --- Hardening: tiny widths, huge queries, empty batches ---------------------------------------

@pytest.mark.parametrize('width', [1e-20, 1e-200])
def test_extremely_narrow_buckets_do_not_overflow(width):
    exact, act = make_pair(bucket_width=width)
    x, pos, mask = make_inputs()
    out, ref = self_attn(act, x, pos, mask), self_attn(exact, x, pos, mask)
    assert last(act).num_clusters.tolist() == [[40] * HEADS, [int((~mask[1]).sum())] * HEADS]
    torch.testing.assert_close(out[~mask], ref[~mask], atol=1e-5, rtol=0)


def test_huge_finite_queries_keep_distinct_clusters():
    _, act = make_pair(bucket_width=8.0)
    x = torch.randn(1, 20, EMBED_DIMS) * 1e30
    out = act(x)
    assert (last(act).num_clusters == 20).all()
    assert out.shape == x.shape


def test_width_below_the_float64_limit_is_a_clear_error():
    _, act = make_pair(bucket_width=1e-310)
    with pytest.raises(ValueError, match='too small.*limit is bucket_width >'):
        act(torch.randn(1, 5, EMBED_DIMS))


@pytest.mark.parametrize('batch_first', [True, False])
def test_empty_batch_with_tokens(batch_first):
    _, act = make_pair(batch_first=batch_first, relative_bucket_width=0.5)
    x = torch.randn(0, 7, EMBED_DIMS) if batch_first else torch.randn(7, 0, EMBED_DIMS)
    out = act(x, query_pos=torch.zeros_like(x),
              key_padding_mask=torch.zeros(0, 7, dtype=torch.bool))
    assert out.shape == x.shape
    assert last(act).num_clusters.shape == (0, HEADS)
    assert act_flops(last(act), act.embed_dims).shape == (0, )


# --- Records: what tools read, through hooks; nothing kept on the layer ------------------------

def test_record_hooks_see_every_forward_and_the_layer_keeps_nothing():
    exact, act = make_pair(bucket_width=1.0)
    x, pos, mask = make_inputs()
    before = set(vars(act))
    with record_act_forwards(torch.nn.ModuleDict(dict(enc=act))) as forwards:
        out = self_attn(act, x, pos, mask)
        with act_exact_mode(act):
            self_attn(act, x, pos, mask)
    self_attn(act, x, pos, mask)  # after the block: not recorded
    assert set(vars(act)) == before  # no measurement state appears on the layer
    (act_record, exact_record), = forwards.values()
    assert act_record.num_hashes == act.num_hashes == 32
    assert act_record.num_queries.tolist() == act_record.num_keys.tolist() == \
        [40, int((~mask[1]).sum())]
    assert act_record.num_clusters.shape == (2, HEADS)
    assert act_record.cluster_ids.shape == (2, HEADS, 40)
    assert act_record.bucket_widths.tolist() == [[1.0] * HEADS] * 2
    assert exact_record.num_clusters is None and exact_record.cluster_ids is None
    # The record is what the functional core returns for the same projected inputs.
    q, k, v, kpm, qpm = act.project_heads(x, None, None, pos, None, mask)
    result = adaptive_clustering_attention(q, k, v, act.lsh, kpm, qpm)
    assert torch.equal(result.cluster_ids, act_record.cluster_ids)
    assert torch.equal(result.num_clusters, act_record.num_clusters)
    assert torch.equal(result.bucket_widths, act_record.bucket_widths)
    assert torch.isfinite(out).all()


def test_functional_core_has_one_return_type():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, HEADS, 9, 8, generator=g) for _ in range(3))
    lsh = E2LSH(8, num_hashes=4, bucket_width=2.0, seed=0)
    for kwargs in (dict(), dict(relative_bucket_width=0.5), dict(bucket_width=0.1)):
        result = adaptive_clustering_attention(q, k, v, lsh, **kwargs)
        assert type(result).__name__ == 'ACTResult' and len(result) == 4
        assert result.output.shape == (2, HEADS, 9, 8)
        assert result.bucket_widths.dtype == torch.float64
    empty = adaptive_clustering_attention(q[:0], k[:0], v[:0], lsh)
    assert type(empty).__name__ == 'ACTResult' and empty.bucket_widths.shape == (0, HEADS)

