"""Benchmark multi-scale deformable attention: the native op vs the grid_sample reference (and
mmcv's op where mmcv has a native kernel for the device; mmcv 2.1 has none on CPU).

Shapes (B=2, heads 8, C 32, P 4):
  encoder     Deformable DETR encoder: levels 100x167, 50x84, 25x42, 13x21; queries = all tokens
  small       levels 64^2, 32^2, 16^2, 8^2; queries = all tokens
  decoder300  encoder levels, 300 queries (Deformable DETR decoder)
  decoder900  encoder levels, 900 queries (DINO decoder)

Example::

    python tools/analysis/benchmark_msda.py --device cpu --threads 1 2 --repeats 5 \\
        --out-dir work_dirs/msda_cpu   # msda.md, msda.csv, msda.png
    python tools/analysis/benchmark_msda.py --device cpu --threads 1 --timer cpu  # shared machine
    python tools/analysis/benchmark_msda.py --device cuda --dtypes float16 --peak-gbps 3350
    python tools/analysis/benchmark_msda.py --device cpu --mixed bfloat16  # + bf16-value rows
    python tools/analysis/benchmark_msda.py --device cpu --threads 1 --timer cpu --skip-reference \
        --shapes encoder --cpu-levels all --vs-copy   # each CPU ISA level, GB/s vs memcpy

Prints, per ``--dtypes`` entry, a markdown table of median milliseconds for the forward (no
grad) and forward+backward, the speed-up of the native op over the reference and, with
``--peak-gbps``, the achieved DRAM bandwidth (compulsory bytes moved / time) as a fraction of the
given peak. ``--mixed DTYPE`` adds the native op in mixed precision: value in DTYPE (bfloat16 /
float16), sampling locations and attention weights in the row's dtype (what ``ms_deform_attn``
runs under autocast), with its speed-up over the native op in that dtype alone. The
implementations of one shape and thread count are timed interleaved, run by run
(``common.time_calls``). ``--out-dir`` also writes the table (``msda.md``), the rows
(``msda.csv``) and a bar chart of forward+backward times on a linear axis with each bar's
speed-up over the reference written on it (``msda.png``); ``--out-png PATH`` writes only the
chart (the older flag).

CPU: ``--vs-copy`` measures the copy bandwidth of this machine (``Tensor.copy_`` of a 256 MiB
buffer, ``--copy-mib``, bytes read + written / time, at the benchmark's thread count) and reports each row's
achieved bandwidth (compulsory bytes / time) as a fraction of it. ``--cpu-levels all`` (or a list
of ``default avx2 avx512``) times the native op at each instruction-set level of the CPU kernels,
each in its own process (the level is fixed when ``mmdet_detrx._C`` loads:
``MMDET_DETRX_CPU_CAPABILITY``), and prints a table of the levels with their speed-up over
``default``.
"""
import argparse
import json
import os
import os.path as osp
import subprocess
import sys
import tempfile
import time

import torch

from mmdet_detrx.ops import ms_deform_attn, ms_deform_attn_pytorch, native_available
from mmdet_detrx.tools.common import (DTYPES, Column, add_common_args, bar_chart, describe_machine,
                                      exit_status, machine_line, markdown_table, time_calls,
                                      write_csv)

ENCODER_LEVELS = ((100, 167), (50, 84), (25, 42), (13, 21))
SHAPES = {
    'encoder': (ENCODER_LEVELS, None),
    'small': (((64, 64), (32, 32), (16, 16), (8, 8)), None),
    'decoder300': (ENCODER_LEVELS, 300),
    'decoder900': (ENCODER_LEVELS, 900),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    add_common_args(parser, 'device', 'dtypes', 'threads', 'repeats', 'warmup', 'timer',
                    'out_dir', repeats=5)
    parser.add_argument('--shapes', nargs='+', choices=list(SHAPES),
                        help='default: small encoder on CPU, all four on CUDA')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--peak-gbps', type=float,
                        help='peak DRAM bandwidth of the device in GB/s (CUDA)')
    parser.add_argument('--mixed', choices=['bfloat16', 'float16'],
                        help='also time the native op with value in this dtype and locations / '
                        'weights in the row\'s dtype (mixed precision)')
    parser.add_argument('--skip-reference', action='store_true',
                        help='time only the native op (the reference is slow on CPU)')
    parser.add_argument('--out-png', help='save only the bar chart of forward+backward times here')
    parser.add_argument('--vs-copy', action='store_true',
                        help='CPU: measure the copy bandwidth and report GB/s as a fraction of it')
    parser.add_argument('--copy-mib', type=int, default=256,
                        help='--vs-copy: size of the copied buffer in MiB (default 256)')
    parser.add_argument('--cpu-levels', nargs='+', metavar='LEVEL',
                        help='CPU: time the native op at these ISA levels (default avx2 avx512, '
                        'or all), each in its own process')
    parser.add_argument('--rows-json', help=argparse.SUPPRESS)  # --cpu-levels' child processes
    args = parser.parse_args(argv)
    try:
        device_type = torch.device(args.device).type
    except RuntimeError:
        device_type = None
    if device_type not in ('cpu', 'cuda'):
        parser.error(f'--device must be cpu or cuda[:N], got {args.device!r}')
    if args.batch < 1:
        parser.error(f'--batch must be at least 1, got {args.batch}')
    if (args.vs_copy or args.cpu_levels) and device_type != 'cpu':
        parser.error('--vs-copy and --cpu-levels apply to --device cpu')
    if args.vs_copy and args.peak_gbps:
        parser.error('--vs-copy measures the bandwidth to compare with: drop --peak-gbps')
    return args


def measure_copy_gbps(threads=None, megabytes=256, repeats=5):
    """This machine's copy bandwidth in GB/s (bytes read + written per second, best of
    ``repeats``): the bound of a memory-bound op on the CPU."""
    if threads is not None:
        torch.set_num_threads(threads)
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


def cpu_levels(requested):
    """The ISA levels to time: ``all`` = every level this CPU supports."""
    supported = list(torch.ops.detrx.cpu_capabilities())
    levels = supported if requested == ['all'] else list(dict.fromkeys(requested))
    missing = [level for level in levels if level not in supported]
    if missing:
        raise SystemExit(f'--cpu-levels: {missing} not supported here; this CPU supports '
                         f'{supported}')
    return levels


def _child_argv(argv, rows_json):
    """argv for one level's process: the same benchmark of the native op alone."""
    skip = {'--cpu-levels', '--out-dir', '--out-png', '--mixed'}
    child, dropping = [], False
    for arg in argv:
        if arg.startswith('--'):
            dropping = arg.split('=')[0] in skip
            if dropping:
                continue
        elif dropping:
            continue
        child.append(arg)
    return child + ['--skip-reference', '--rows-json', rows_json]


def benchmark_cpu_levels(args, argv):
    """Run the native op at each level in a subprocess; print and return one row per level."""
    levels = cpu_levels(args.cpu_levels)
    rows = []
    for level in levels:
        with tempfile.TemporaryDirectory() as tmp:
            rows_json = osp.join(tmp, 'rows.json')
            env = dict(os.environ, MMDET_DETRX_CPU_CAPABILITY=level)
            subprocess.run([sys.executable, '-m', 'mmdet_detrx.tools.analysis.benchmark_msda',
                            *_child_argv(argv, rows_json)], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            with open(rows_json) as f:
                rows += [dict(row, level=level) for row in json.load(f)]
    baseline = {(r['dtype'], r['shape'], r['threads']): r for r in rows
                if r['level'] == levels[0]}
    for row in rows:
        base = baseline[(row['dtype'], row['shape'], row['threads'])]
        row['vs_first'] = (f'{base["forward_ms"] / row["forward_ms"]:.2f}x fwd, '
                           f'{base["fwd_bwd_ms"] / row["fwd_bwd_ms"]:.2f}x fwd+bwd')
    columns = [Column('dtype', align='left'), Column('shape', align='left'), Column('threads'),
               Column('level', align='left'), Column('forward_ms', 'forward ms', '{:.2f}'),
               Column('fwd_bwd_ms', 'fwd+bwd ms', '{:.2f}'),
               Column('vs_first', f'speed-up vs {levels[0]}')]
    columns += [Column(key, label) for key, label in (('fwd_gbps', 'fwd GB/s'),
                                                      ('fwd_bwd_gbps', 'fwd+bwd GB/s'))
                if any(key in r for r in rows)]
    print(f'\n# MSDA native op per CPU ISA level: {machine_line("cpu")}')
    print(markdown_table(rows, columns), flush=True)
    return rows


def make_inputs(levels, queries, batch, dtype, device, heads=8, channels=32, points=4):
    generator = torch.Generator().manual_seed(0)
    spatial_shapes = torch.tensor(levels, dtype=torch.int64)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    tokens = int(sizes.sum())
    queries = tokens if queries is None else queries
    value = torch.randn(batch, tokens, heads, channels, generator=generator)
    # As in Deformable DETR: each query samples around its reference point (encoder: the centre
    # of its own pixel; decoder: a random point), with offsets of a few pixels of each level.
    if queries == tokens:
        centres = [torch.stack(torch.meshgrid((torch.arange(W) + 0.5) / W,
                                              (torch.arange(H) + 0.5) / H, indexing='xy'),
                               -1).reshape(-1, 2) for H, W in levels]
        reference = torch.cat(centres)  # (Q, 2) normalised (x, y)
    else:
        reference = torch.rand(queries, 2, generator=generator)
    level_sizes = torch.tensor([[W, H] for H, W in levels], dtype=torch.float32)  # (L, 2)
    offsets = 2 * torch.randn(batch, queries, heads, len(levels), points, 2,
                              generator=generator)  # pixels
    locations = reference[None, :, None, None, None] + offsets / level_sizes[:, None]
    weights = torch.rand(batch, queries, heads, len(levels), points, generator=generator)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    floats = [t.to(device, dtype) for t in (value, locations, weights)]
    return floats[0], spatial_shapes.to(device), level_start_index.to(device), floats[1], \
        floats[2]


def mmcv_op():
    """mmcv's autograd Function, or None (mmcv missing or built without CUDA ops)."""
    try:
        from mmcv.ops.multi_scale_deform_attn import MultiScaleDeformableAttnFunction
    except Exception:  # ImportError, or mmcv built without its ops
        return None
    return MultiScaleDeformableAttnFunction.apply


def implementations(device):
    impls = {
        'native': lambda v, s, i, l, w: ms_deform_attn(v, s, i, l, w, 64),
        'pytorch': lambda v, s, i, l, w: ms_deform_attn_pytorch(v, s, l, w),
    }
    mmcv = mmcv_op() if device == 'cuda' else None  # mmcv 2.1's MSDA has no CPU kernel
    if mmcv is not None:
        impls['mmcv'] = lambda v, s, i, l, w: mmcv(v, s, i, l, w, 64)
    return impls


def compulsory_bytes(value, locations, weights, backward):
    """Bytes every implementation must move at least once (inputs read, outputs written)."""
    elt = value.element_size()  # output and grad_output have value's dtype
    output = value.shape[0] * locations.shape[1] * value.shape[2] * value.shape[3]
    coordinates = locations.numel() * locations.element_size() + \
        weights.numel() * weights.element_size()
    forward = (value.numel() + output) * elt + coordinates
    if not backward:
        return forward
    # forward + backward: reads value, locations, weights, grad_output again and writes the
    # three gradients (grad_value at least once, as fp32 when the kernel accumulates in fp32).
    grads = value.numel() * max(elt, 4) + coordinates
    return 2 * forward + grads


def timed_calls(impl, inputs):
    """``(forward, forward_backward)`` closures of one implementation on ``inputs``."""
    value, shapes, starts, locations, weights = inputs

    def forward():
        with torch.no_grad():
            impl(value, shapes, starts, locations, weights)

    leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]
    grad_output = None

    def forward_backward():
        nonlocal grad_output
        out = impl(leaves[0], shapes, starts, leaves[1], leaves[2])
        if grad_output is None:
            grad_output = torch.randn_like(out)
        torch.autograd.grad(out, leaves, grad_output)

    return forward, forward_backward


def benchmark_dtype(args, dtype_name, shape_names, threads, impls):
    """Print the table of one dtype; returns its rows (dicts, one per implementation)."""
    device, dtype = args.device, DTYPES[dtype_name]
    mixed_name = f'native {args.mixed} value' if args.mixed else None
    if mixed_name:
        if dtype not in (torch.float32, torch.float64):
            raise SystemExit(f'--mixed: the dtype must be float32 or float64 (the locations\' '
                             f'dtype), got {dtype_name}')
        impls = dict(impls, **{mixed_name: impls['native']})
    print(f'# MSDA benchmark: {machine_line(device)}, {dtype_name}, B={args.batch}, heads 8, '
          f'C 32, P 4, median of {args.repeats}, {args.timer} time')
    columns = [Column('shape', align='left'), Column('queries'), Column('threads'),
               Column('impl', align='left'), Column('forward_ms', 'forward ms', '{:.2f}'),
               Column('fwd_bwd_ms', 'fwd+bwd ms', '{:.2f}'),
               Column('speed_up', 'fwd+bwd speed-up')]
    reference = 'copy' if args.vs_copy else 'peak'
    if args.peak_gbps:
        columns += [Column('fwd_gbps', f'fwd GB/s (% {reference})'),
                    Column('fwd_bwd_gbps', f'fwd+bwd GB/s (% {reference})')]
    rows = []
    for shape_name in shape_names:
        levels, queries = SHAPES[shape_name]
        inputs = make_inputs(levels, queries, args.batch, dtype, device)
        for num_threads in threads:
            if num_threads is not None:
                torch.set_num_threads(num_threads)
            calls, impl_inputs_of = {}, {}
            for name, impl in impls.items():
                impl_inputs = inputs
                if name == mixed_name:  # low-precision value, locations / weights in dtype
                    impl_inputs = (inputs[0].to(DTYPES[args.mixed]), *inputs[1:])
                impl_inputs_of[name] = impl_inputs
                calls[(name, 'fwd')], calls[(name, 'fwd+bwd')] = timed_calls(impl, impl_inputs)
            timings = time_calls(calls, repeats=args.repeats, warmup=args.warmup, device=device,
                                 clock=args.timer)
            ms = {key: timing.median_ms for key, timing in timings.items()}
            for name in impls:
                forward, forward_backward = ms[(name, 'fwd')], ms[(name, 'fwd+bwd')]
                speed_up = '-'
                if 'pytorch' in impls:
                    speed_up = f'{ms[("pytorch", "fwd+bwd")] / forward_backward:.1f}x'
                if name == mixed_name:
                    speed_up += (f' ({ms[("native", "fwd")] / forward:.2f}x fwd, '
                                 f'{ms[("native", "fwd+bwd")] / forward_backward:.2f}x fwd+bwd '
                                 'vs native)')
                row = dict(dtype=dtype_name, shape=shape_name, queries=inputs[3].shape[1],
                           threads=num_threads or '-', impl=name, forward_ms=forward,
                           fwd_bwd_ms=forward_backward, speed_up=speed_up)
                if args.peak_gbps:
                    value, _, _, locations, weights = impl_inputs_of[name]
                    for key, time_ms, backward in (('fwd_gbps', forward, False),
                                                   ('fwd_bwd_gbps', forward_backward, True)):
                        gbps = compulsory_bytes(value, locations, weights, backward) / time_ms / 1e6
                        row[key] = f'{gbps:.0f} ({100 * gbps / args.peak_gbps:.0f}%)'
                rows.append(row)
    print(markdown_table(rows, columns), flush=True)
    return rows, columns


def main(argv=None):
    """Run the benchmark; returns the rows of every table (dicts)."""
    args = parse_args(argv)
    device = args.device
    device_type = torch.device(device).type
    if not native_available():
        raise SystemExit('mmdet_detrx._C is not built: python setup.py build_ext --inplace')
    if device_type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda: no CUDA device')
    shape_names = args.shapes or (['small', 'encoder'] if device_type == 'cpu' else list(SHAPES))
    threads = args.threads or ([1, torch.get_num_threads()] if device_type == 'cpu' else [None])
    threads = list(dict.fromkeys(threads))
    impls = implementations(device_type)
    if args.skip_reference:
        impls.pop('pytorch')

    if args.vs_copy:
        args.peak_gbps = measure_copy_gbps(threads[0], args.copy_mib)
        print(f'copy bandwidth: {args.peak_gbps:.1f} GB/s (Tensor.copy_ of {args.copy_mib} MiB, '
              f'read + written, {threads[0]} thread(s))')
    if args.cpu_levels:
        level_rows = benchmark_cpu_levels(args, list(sys.argv[1:] if argv is None else argv))
        if args.skip_reference and not args.mixed:
            return level_rows  # the level table is the whole answer

    rows, tables = [], []
    for dtype_name in dict.fromkeys(args.dtypes):
        dtype_rows, columns = benchmark_dtype(args, dtype_name, shape_names, threads, impls)
        rows += dtype_rows
        tables.append(markdown_table(dtype_rows, columns))
    if args.rows_json:
        with open(args.rows_json, 'w') as f:
            json.dump(rows, f)
        return rows
    if device_type == 'cpu':
        print('\nmmcv: not timed (mmcv 2.1 MultiScaleDeformableAttention has no CPU kernel)')
    elif 'mmcv' not in impls:
        print('\nmmcv: not timed (mmcv or its CUDA ops not installed)')

    machine = describe_machine(device)
    title = f'MSDA fwd+bwd, {machine.get("gpu", machine["cpu"])}, {", ".join(args.dtypes)}'
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(osp.join(args.out_dir, 'msda.md'), 'w') as f:
            f.write('\n\n'.join(tables) + '\n')
        write_csv(rows, osp.join(args.out_dir, 'msda.csv'))
        save_chart(rows, osp.join(args.out_dir, 'msda.png'), title)
        print(f'wrote {args.out_dir}/msda.md, msda.csv, msda.png')
    if args.out_png:
        save_chart(rows, args.out_png, title)
    return rows


def save_chart(rows, path, title):
    """Forward+backward ms per (shape, threads, dtype) group, one bar per implementation, on a
    linear axis; each bar is labelled with its speed-up over the reference (over the native op
    with ``--skip-reference``)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    several_dtypes = len({row['dtype'] for row in rows}) > 1

    def group(row):
        label = row['shape'] + (f'\n{row["threads"]}T' if row['threads'] != '-' else '')
        return label + (f'\n{row["dtype"]}' if several_dtypes else '')

    groups = list(dict.fromkeys(group(row) for row in rows))
    series = list(dict.fromkeys(row['impl'] for row in rows))
    values = {(group(row), row['impl']): row['fwd_bwd_ms'] for row in rows}
    baseline = 'pytorch' if 'pytorch' in series else 'native'
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 + 1.4 * len(groups)), 4))
    bar_chart(ax, groups, series, values, baseline=baseline, ratio='speedup',
              ylabel='forward + backward, ms', title=title)
    fig.tight_layout()
    if osp.dirname(path):
        os.makedirs(osp.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f'saved {path}')


if __name__ == '__main__':
    sys.exit(exit_status(main()))
