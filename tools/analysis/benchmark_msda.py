"""Benchmark multi-scale deformable attention: the native op vs the grid_sample reference (and
mmcv's op where mmcv has a native kernel for the device; mmcv 2.1 has none on CPU).

Shapes (B=2, heads 8, C 32, P 4):
  encoder     Deformable DETR encoder: levels 100x167, 50x84, 25x42, 13x21; queries = all tokens
  small       levels 64^2, 32^2, 16^2, 8^2; queries = all tokens
  decoder300  encoder levels, 300 queries (Deformable DETR decoder)
  decoder900  encoder levels, 900 queries (DINO decoder)

Example::

    python tools/analysis/benchmark_msda.py --device cpu --threads 1 2 --repeat 5 \\
        --out-png work_dirs/msda_cpu.png
    python tools/analysis/benchmark_msda.py --device cpu --threads 1 --timer cpu  # shared machine
    python tools/analysis/benchmark_msda.py --device cuda --dtype float16 --peak-gbps 3350
    python tools/analysis/benchmark_msda.py --device cpu --mixed bfloat16  # + bf16-value rows

Prints a markdown table of median milliseconds for the forward (no grad) and forward+backward,
the speed-up of the native op over the reference and, with ``--peak-gbps``, the achieved DRAM
bandwidth (compulsory bytes moved / time) as a fraction of the given peak. ``--mixed DTYPE``
adds the native op in mixed precision: value in DTYPE (bfloat16 / float16), sampling locations
and attention weights in ``--dtype`` (what ``ms_deform_attn`` runs under autocast), with its
speed-up over the native op in ``--dtype`` alone.
"""
import argparse
import statistics
import time

import torch

from mmdet_detrx.ops import ms_deform_attn, ms_deform_attn_pytorch, native_available

ENCODER_LEVELS = ((100, 167), (50, 84), (25, 42), (13, 21))
SHAPES = {
    'encoder': (ENCODER_LEVELS, None),
    'small': (((64, 64), (32, 32), (16, 16), (8, 8)), None),
    'decoder300': (ENCODER_LEVELS, 300),
    'decoder900': (ENCODER_LEVELS, 900),
}
DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16,
          'float64': torch.float64}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
    parser.add_argument('--dtype', choices=list(DTYPES), default='float32')
    parser.add_argument('--shapes', nargs='+', choices=list(SHAPES),
                        help='default: small encoder on CPU, all four on CUDA')
    parser.add_argument('--threads', type=int, nargs='+',
                        help='CPU thread counts to run (default: 1 and all cores)')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--repeat', type=int, default=5, help='timed runs (median reported)')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--timer', choices=['wall', 'cpu'], default='wall',
                        help='cpu: process CPU time (summed over threads), robust to other '
                        'load on a shared machine; meaningful as a latency with --threads 1')
    parser.add_argument('--peak-gbps', type=float,
                        help='peak DRAM bandwidth of the device in GB/s (CUDA)')
    parser.add_argument('--mixed', choices=['bfloat16', 'float16'],
                        help='also time the native op with value in this dtype and locations / '
                        'weights in --dtype (mixed precision)')
    parser.add_argument('--skip-reference', action='store_true',
                        help='time only the native op (the reference is slow on CPU)')
    parser.add_argument('--out-png', help='save a bar chart of forward+backward times')
    return parser.parse_args()


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


def sync(device):
    if device == 'cuda':
        torch.cuda.synchronize()


def time_ms(fn, device, repeat, warmup, clock=time.perf_counter):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        start = clock()
        fn()
        sync(device)
        times.append((clock() - start) * 1e3)
    return statistics.median(times)


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


def benchmark(impl, inputs, device, repeat, warmup, clock):
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

    return (time_ms(forward, device, repeat, warmup, clock),
            time_ms(forward_backward, device, repeat, warmup, clock))


def main():
    args = parse_args()
    device, dtype = args.device, DTYPES[args.dtype]
    if not native_available():
        raise SystemExit('mmdet_detrx._C is not built: python setup.py build_ext --inplace')
    if device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda: no CUDA device')
    shape_names = args.shapes or (['small', 'encoder'] if device == 'cpu' else list(SHAPES))
    threads = args.threads or ([1, torch.get_num_threads()] if device == 'cpu' else [None])
    threads = list(dict.fromkeys(threads))
    impls = implementations(device)
    if args.timer == 'cpu' and device == 'cuda':
        raise SystemExit('--timer cpu measures host CPU time: use wall on CUDA')
    clock = time.process_time if args.timer == 'cpu' else time.perf_counter
    if args.skip_reference:
        impls.pop('pytorch')
    mixed_name = None
    if args.mixed:
        if dtype not in (torch.float32, torch.float64):
            raise SystemExit('--mixed: --dtype must be float32 or float64 (the locations\' dtype)')
        mixed_name = f'native {args.mixed} value'
        impls[mixed_name] = impls['native']

    if device == 'cuda':
        machine = torch.cuda.get_device_name()
    else:
        machine = f'CPU, {torch.get_num_threads()} torch threads available'
    print(f'# MSDA benchmark: {machine}, torch {torch.__version__}, {args.dtype}, '
          f'B={args.batch}, heads 8, C 32, P 4, median of {args.repeat}, {args.timer} time')
    columns = ['shape', 'queries', 'threads', 'impl', 'forward ms', 'fwd+bwd ms',
               'fwd+bwd speed-up']
    if args.peak_gbps:
        columns += ['fwd GB/s (% peak)', 'fwd+bwd GB/s (% peak)']
    print('| ' + ' | '.join(columns) + ' |')
    print('|' + '---|' * len(columns))

    rows = []
    for shape_name in shape_names:
        levels, queries = SHAPES[shape_name]
        inputs = make_inputs(levels, queries, args.batch, dtype, device)
        for num_threads in threads:
            if num_threads is not None:
                torch.set_num_threads(num_threads)
            results, impl_inputs_of = {}, {}
            for name, impl in impls.items():
                impl_inputs = inputs
                if name == mixed_name:  # low-precision value, locations / weights in --dtype
                    impl_inputs = (inputs[0].to(DTYPES[args.mixed]), *inputs[1:])
                impl_inputs_of[name] = impl_inputs
                results[name] = benchmark(impl, impl_inputs, device, args.repeat, args.warmup,
                                          clock)
            baseline = results.get('pytorch')
            for name, (forward, forward_backward) in results.items():
                speed_up = f'{baseline[1] / forward_backward:.1f}x' if baseline else '-'
                if name == mixed_name:
                    native = results['native']
                    speed_up += (f' ({native[0] / forward:.2f}x fwd, '
                                 f'{native[1] / forward_backward:.2f}x fwd+bwd vs native)')
                cells = [shape_name, str(inputs[3].shape[1]), str(num_threads or '-'), name,
                         f'{forward:.2f}', f'{forward_backward:.2f}', speed_up]
                if args.peak_gbps:
                    for ms, backward in ((forward, False), (forward_backward, True)):
                        value, _, _, locations, weights = impl_inputs_of[name]
                        gbps = compulsory_bytes(value, locations, weights, backward) / ms / 1e6
                        cells.append(f'{gbps:.0f} ({100 * gbps / args.peak_gbps:.0f}%)')
                print('| ' + ' | '.join(cells) + ' |', flush=True)
                rows.append((f'{shape_name}\n{num_threads or ""}'
                             f'{"T" if num_threads else ""}', name, forward_backward))
    if device == 'cpu':
        print('\nmmcv: not timed (mmcv 2.1 MultiScaleDeformableAttention has no CPU kernel)')
    elif 'mmcv' not in impls:
        print('\nmmcv: not timed (mmcv or its CUDA ops not installed)')

    if args.out_png:
        save_chart(rows, args.out_png, f'MSDA forward+backward, {machine}, {args.dtype}')


def save_chart(rows, path, title):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(group for group, _, _ in rows))
    names = list(dict.fromkeys(name for _, name, _ in rows))
    times = {(group, name): ms for group, name, ms in rows}
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(groups), 4))
    for index, name in enumerate(names):
        xs = [g + index * width for g in range(len(groups))]
        ax.bar(xs, [times.get((group, name), 0) for group in groups], width, label=name)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups)
    ax.set_yscale('log')
    ax.set_ylabel('forward + backward, ms (log)')
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f'saved {path}')


if __name__ == '__main__':
    main()
