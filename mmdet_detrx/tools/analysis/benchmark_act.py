"""Benchmark ACT's attention alone against exact attention, on tokens with realistic redundancy.

    python tools/analysis/benchmark_act.py [--tokens 1024 4096 16384] [--heads 8]
        [--embed-dims 256] [--num-hashes 32] [--bucket-width 2.0] [--target-error 0.04]
        [--no-calibrate] [--repeats 3] [--timer wall|cpu] [--out-dir DIR] [--device cpu]

Tokens: a documented clustered mixture standing in for a DETR encoder feature map, whose large
flat regions (sky, road, wall) repeat nearly the same feature. ``--regions`` centres
``c_j ~ N(0, I)`` (default: one per 64 tokens) with mixture weights ~ Dirichlet(1); each token is
``c_z + sigma * eps`` (``--noise`` sigma = 0.05, eps ~ N(0, I)), then layer-normalised as the
encoder's inputs are; the positional term is omitted. The weights are a freshly initialised
mmcv ``MultiheadAttention`` (xavier in-projection, as nn.MultiheadAttention initialises it).

Two comparisons per size:
  * module: ``AdaptiveClusteringAttention`` vs mmcv ``MultiheadAttention`` (same weights, both
    with projections and the output projection);
  * core: ACT's clustered attention on the projected per-head q, k, v vs
    ``torch.nn.functional.scaled_dot_product_attention`` on the same q, k, v.
Two settings per size: the hand-chosen ``--bucket-width`` (skipped with ``--bucket-width 0``) and,
unless ``--no-calibrate``, the width :func:`mmdet_detrx.models.layers.calibrate_bucket_width`
picks for ``--target-error`` on a *held-out* draw of the same mixture (another seed, same size):
nobody chooses r. Reported: mean clusters per head, relative output error
``||act - exact|| / ||exact||`` (core) on the benchmark draw, the median wall time of ``--repeats``
runs and the speed-ups. ``--timer cpu`` measures process CPU time instead of wall time (CPU only):
on a machine shared with other jobs it is not inflated by their load (with one thread it is the
compute cost itself). Writes ``benchmark_act.csv`` and
``benchmark_act.md`` and ``benchmark_act.png`` to ``--out-dir`` when given.
"""
import argparse
import os
import os.path as osp
import sys
import time

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from mmcv.cnn.bricks.transformer import MultiheadAttention  # noqa: E402

from mmdet_detrx.models.layers import (AdaptiveClusteringAttention,  # noqa: E402
                                       adaptive_clustering_attention, calibrate_bucket_width)
from mmdet_detrx.tools.common import (Column, add_common_args, exit_status,  # noqa: E402
                                      machine_line, markdown_table, time_call, write_csv)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--tokens', type=int, nargs='+', default=[1024, 4096, 16384])
    parser.add_argument('--heads', type=int, default=8)
    parser.add_argument('--embed-dims', type=int, default=256)
    parser.add_argument('--num-hashes', type=int, default=32)
    parser.add_argument('--bucket-width', type=float, default=2.0,
                        help='hand-chosen E2LSH r on q / sqrt(head_dims) (default 2.0; 0: '
                        'only the calibrated setting)')
    parser.add_argument('--target-error', type=float, default=0.04,
                        help='relative error the calibrated r is chosen for on a held-out '
                        'draw (default 0.04, a margin under the 5%% goal)')
    parser.add_argument('--no-calibrate', action='store_true',
                        help='skip the calibrated setting')
    parser.add_argument('--regions', type=int, default=None,
                        help='mixture centres (default: tokens // 64)')
    parser.add_argument('--noise', type=float, default=0.05, help='sigma of the token noise')
    parser.add_argument('--mmcv-max-tokens', type=int, default=None,
                        help='skip the mmcv MultiheadAttention comparison above this many tokens '
                        '(it forms the N x N weights: ~9 GB at 16k tokens, 8 heads)')
    # --repeats (old spelling --repeat), --timer, --seed, --device, --out-dir
    add_common_args(parser, 'repeats', 'timer', 'seed', 'device', 'out_dir')
    return parser.parse_args(argv)


def clustered_tokens(num_tokens, embed_dims, regions, noise, generator):
    """(1, num_tokens, embed_dims) layer-normalised mixture of ``regions`` noisy centres."""
    centres = torch.randn(regions, embed_dims, generator=generator)
    weights = torch.distributions.Dirichlet(torch.ones(regions)).sample()
    which = torch.multinomial(weights, num_tokens, replacement=True, generator=generator)
    tokens = centres[which] + noise * torch.randn(num_tokens, embed_dims, generator=generator)
    return F.layer_norm(tokens, (embed_dims, )).unsqueeze(0)


def timed(fn, repeat, device, timer='wall'):
    """``(last output, median seconds)`` of ``repeat`` runs after one warm-up run (first-call
    allocations and kernel selection are not timed)."""
    timing = time_call(fn, repeats=repeat, warmup=1, device=device, clock=timer)
    return timing.output, timing.median


def make_tokens(args, num_tokens, seed):
    generator = torch.Generator().manual_seed(seed)
    regions = args.regions or max(1, num_tokens // 64)
    x = clustered_tokens(num_tokens, args.embed_dims, regions, args.noise, generator)
    return x.to(args.device), regions


@torch.no_grad()
def bench_size(args, num_tokens):
    """Rows (one per setting) for ``num_tokens`` tokens."""
    torch.manual_seed(args.seed)
    x, regions = make_tokens(args, num_tokens, args.seed)
    exact = MultiheadAttention(args.embed_dims, args.heads, batch_first=True).eval()
    act = AdaptiveClusteringAttention(args.embed_dims, args.heads, batch_first=True,
                                      num_hashes=args.num_hashes, seed=args.seed).eval()
    act.load_state_dict(exact.state_dict())
    exact.to(args.device)
    act.to(args.device)

    settings = []
    if args.bucket_width > 0:
        settings.append((f'r={args.bucket_width:g} (hand)', args.bucket_width, None))
    if not args.no_calibrate:
        held_out, _ = make_tokens(args, num_tokens, args.seed + 1000)
        start = time.perf_counter()
        width = calibrate_bucket_width(act, held_out, target_error=args.target_error)
        settings.append((f'calibrated ({100 * args.target_error:g}%)', width,
                         time.perf_counter() - start))

    with_mmcv = args.mmcv_max_tokens is None or num_tokens <= args.mmcv_max_tokens
    if with_mmcv:
        ref_module, t_mmcv = timed(lambda: exact(x), args.repeats, args.device, args.timer)
    else:
        ref_module, t_mmcv = None, float('nan')
    head_dims = args.embed_dims // args.heads
    qkv = F.linear(x, act.attn.in_proj_weight, act.attn.in_proj_bias)
    q, k, v = (t.reshape(1, num_tokens, args.heads, head_dims).transpose(1, 2).contiguous()
               for t in qkv.chunk(3, dim=-1))  # (1, heads, N, head_dims)
    ref_core, t_sdpa = timed(lambda: F.scaled_dot_product_attention(q, k, v), args.repeats,
                             args.device, args.timer)
    rows = []
    for name, width, calibration_s in settings:
        act.bucket_width = width
        out_module, t_act_module = timed(lambda: act(x), args.repeats, args.device, args.timer)
        act_core, t_act_core = timed(
            lambda: adaptive_clustering_attention(q, k, v, act.lsh), args.repeats, args.device,
            args.timer)
        rows.append(dict(
            tokens=num_tokens,
            regions=regions,
            setting=name,
            bucket_width=width,
            calibration_s=calibration_s,
            clusters=round(act_core.num_clusters.float().mean().item(), 1),
            rel_err=((act_core.output - ref_core).norm() / ref_core.norm()).item(),
            rel_err_module=(((out_module - ref_module).norm() / (ref_module - x).norm()).item()
                            if with_mmcv else float('nan')),
            sdpa_s=t_sdpa,
            act_core_s=t_act_core,
            speedup_vs_sdpa=t_sdpa / t_act_core,
            mmcv_s=t_mmcv,
            act_module_s=t_act_module,
            speedup_vs_mmcv=t_mmcv / t_act_module,
        ))
    return rows


TABLE = [Column('tokens'), Column('regions'), Column('setting', align='left'),
         Column('bucket_width', 'r', '{:.3g}'), Column('clusters', 'clusters/head'),
         Column('rel_err_pct', 'rel. err (core)', '{:.2f}%'),
         Column('sdpa_s', 'SDPA (s)', '{:.3f}'), Column('act_core_s', 'ACT core (s)', '{:.3f}'),
         Column('speedup_vs_sdpa', 'speed-up vs SDPA', '{:.2f}x'),
         Column('mmcv_s', 'mmcv MHA (s)', '{:.3f}'),
         Column('act_module_s', 'ACT module (s)', '{:.3f}'),
         Column('speedup_vs_mmcv', 'speed-up vs mmcv', '{:.2f}x')]


def to_markdown(rows):
    """The rows as a markdown table; '-' where a time was not measured (nan)."""
    cells = [{key: (None if value != value else value) for key, value in  # nan -> '-'
              dict(row, rel_err_pct=100 * row['rel_err']).items()} for row in rows]
    return markdown_table(cells, TABLE)


def plot(rows, path):
    """Speed-up of the ACT core over SDPA per size and setting; linear axis, ratio on each bar."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    sizes = list(dict.fromkeys(r['tokens'] for r in rows))
    settings = list(dict.fromkeys(r['setting'] for r in rows))
    bar = 0.8 / len(settings)
    for j, setting in enumerate(settings):
        sub = {r['tokens']: r for r in rows if r['setting'] == setting}
        xs = [i + (j - (len(settings) - 1) / 2) * bar for i in range(len(sizes))]
        heights = [sub[n]['speedup_vs_sdpa'] if n in sub else 0.0 for n in sizes]
        bars = ax.bar(xs, heights, width=bar, label=setting)
        for rect, n in zip(bars, sizes):
            if n in sub:
                ax.annotate(f"{sub[n]['speedup_vs_sdpa']:.1f}x\n{100 * sub[n]['rel_err']:.1f}%",
                            (rect.get_x() + rect.get_width() / 2, rect.get_height()),
                            ha='center', va='bottom', fontsize=7)
    ax.axhline(1.0, color='grey', linewidth=0.8)
    ax.set_xticks(range(len(sizes)))
    ax.set_xticklabels([str(n) for n in sizes])
    ax.set_xlabel('tokens')
    ax.set_ylabel('speed-up of ACT core vs SDPA (x)')
    ax.set_title('ACT vs exact attention (label: speed-up, rel. error)')
    ax.margins(y=0.2)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.embed_dims % args.heads:
        raise ValueError('--embed-dims must be divisible by --heads')
    if args.timer == 'cpu' and not args.device.startswith('cpu'):
        raise ValueError('--timer cpu measures CPU time: use it with --device cpu')
    if args.bucket_width <= 0 and args.no_calibrate:
        raise ValueError('nothing to measure: --bucket-width 0 and --no-calibrate')
    rows = [row for n in args.tokens for row in bench_size(args, n)]
    table = to_markdown(rows)
    print(f'machine: {machine_line(args.device)}; heads={args.heads}, '
          f'embed_dims={args.embed_dims}, '
          f'L={args.num_hashes}, noise={args.noise}, calibration target={args.target_error}, '
          f'timer={args.timer}')
    print(table)
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        write_csv(rows, osp.join(args.out_dir, 'benchmark_act.csv'))
        with open(osp.join(args.out_dir, 'benchmark_act.md'), 'w') as f:
            f.write(f'machine: {machine_line(args.device)}, timer: {args.timer}\n\n{table}\n')
        plot(rows, osp.join(args.out_dir, 'benchmark_act.png'))
    return rows


if __name__ == '__main__':
    sys.exit(exit_status(main()))
