"""Forward time and peak memory of BoTNet vs the ResNet it modifies, same run, same input.

Every (backbone, input size) pair is measured in a fresh subprocess so that peak memory is
that pair's own: on CPU the growth of the process's peak resident set size during the forward
passes (activations and workspaces; weights and input are allocated before), on CUDA
``torch.cuda.max_memory_allocated`` minus the memory held before the forward passes.

Example (CPU, the numbers in docs/botnet.md)::

    python tools/analysis/benchmark_botnet.py --sizes 1024x1024 800x1333 --repeat 5 \
        --out work_dirs/benchmark_botnet.md
"""
import argparse
import json
import resource
import subprocess
import sys
import time

import torch

BACKBONES = {
    'R50': dict(type='ResNet', depth=50),
    'BoT50': dict(type='BoTNet', depth=50),
    'R101': dict(type='ResNet', depth=101),
    'BoT101': dict(type='BoTNet', depth=101),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--backbones', nargs='+', default=['R50', 'BoT50'],
                        choices=sorted(BACKBONES))
    parser.add_argument('--sizes', nargs='+', default=['1024x1024', '800x1333'],
                        help='input sizes as HxW')
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--repeat', type=int, default=5, help='timed forward passes')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--dtype', default='float32', choices=['float32', 'float16', 'bfloat16'],
                        help='autocast dtype for the forward (float32: no autocast)')
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads')
    parser.add_argument('--query-chunk-size', default='1024',
                        help="BoT backbones' query_chunk_size: an int, or 'none' for all "
                        'queries at once (default 1024, BoTNet\'s default)')
    parser.add_argument('--out', help='also write the markdown table to this file')
    parser.add_argument('--out-png', help='also save a bar chart of time and memory (PNG)')
    parser.add_argument('--single', nargs=2, metavar=('BACKBONE', 'SIZE'),
                        help=argparse.SUPPRESS)  # internal: measure one pair, print JSON
    return parser.parse_args()


def parse_size(text):
    try:
        height, width = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise ValueError(f'sizes must look like 800x1333 (HxW), got {text!r}') from None
    return height, width


def parse_chunk(text):
    if str(text).lower() == 'none':
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"--query-chunk-size must be a positive int or 'none', got {text!r}")
    return value


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(args, name, size):
    """Median forward time (ms) and peak extra memory (MiB) of one backbone at one size."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    import mmdet_detrx  # noqa: F401  (registers BoTNet)
    register_all_modules(init_default_scope=False)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = dict(BACKBONES[name])
    if cfg['type'] == 'BoTNet':
        cfg['query_chunk_size'] = parse_chunk(args.query_chunk_size)
    model = MODELS.build(cfg).to(device)
    model.eval()  # mmdet's ResNet.train() returns None, so no chaining
    num_params = sum(p.numel() for p in model.parameters())
    x = torch.randn(args.batch_size, 3, *size, device=device)
    autocast = torch.autocast(device.type, dtype=getattr(torch, args.dtype),
                              enabled=args.dtype != 'float32')

    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize()

    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
        memory_before = torch.cuda.memory_allocated()
    else:
        memory_before = peak_rss_bytes()
    times = []
    with torch.no_grad(), autocast:
        for i in range(args.warmup + args.repeat):
            sync()
            start = time.perf_counter()
            outs = model(x)
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
            del outs
    if device.type == 'cuda':
        peak = torch.cuda.max_memory_allocated() - memory_before
    else:
        peak = peak_rss_bytes() - memory_before
    times.sort()
    return dict(backbone=name, size=f'{size[0]}x{size[1]}', params_m=num_params / 1e6,
                ms=1e3 * times[len(times) // 2], ms_min=1e3 * times[0],
                memory_mib=peak / 2**20)


def main():
    args = parse_args()
    if args.single:
        print(json.dumps(measure(args, args.single[0], parse_size(args.single[1]))))
        return
    sizes = [parse_size(s) for s in args.sizes]  # validate before spawning anything
    parse_chunk(args.query_chunk_size)
    passthrough = [f'--batch-size={args.batch_size}', f'--repeat={args.repeat}',
                   f'--warmup={args.warmup}', f'--device={args.device}', f'--dtype={args.dtype}',
                   f'--query-chunk-size={args.query_chunk_size}']
    if args.threads:
        passthrough.append(f'--threads={args.threads}')
    rows = []
    for height, width in sizes:
        for name in args.backbones:
            cmd = [sys.executable, __file__, '--single', name, f'{height}x{width}', *passthrough]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode:
                sys.exit(f'{name} {height}x{width} failed:\n{result.stderr}')
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(f'{name} {height}x{width}: {rows[-1]["ms"]:.0f} ms', file=sys.stderr)

    device = (torch.cuda.get_device_name(args.device) if args.device.startswith('cuda') else
              f'CPU, {args.threads or torch.get_num_threads()} threads')
    lines = [
        f'Backbone forward, batch {args.batch_size}, {args.dtype}, {device}; median of '
        f'{args.repeat} after {args.warmup} warm-up; memory = peak growth during the forward; '
        f'BoT query_chunk_size={args.query_chunk_size}; x ResNet: memory over the ResNet of the '
        'same depth at the same size.',
        '',
        '| backbone | params (M) | input HxW | forward (ms) | min (ms) | peak memory (MiB) '
        '| memory x ResNet |',
        '|---|---:|---|---:|---:|---:|---:|',
    ]
    memory = {(row['backbone'], row['size']): row['memory_mib'] for row in rows}
    for row in rows:
        resnet = memory.get((row['backbone'].replace('BoT', 'R'), row['size']))
        ratio = f'{row["memory_mib"] / resnet:.2f}x' if resnet else '-'
        lines.append(f'| {row["backbone"]} | {row["params_m"]:.2f} | {row["size"]} | '
                     f'{row["ms"]:.0f} | {row["ms_min"]:.0f} | {row["memory_mib"]:.0f} | '
                     f'{ratio} |')
    table = '\n'.join(lines)
    print(table)
    if args.out:
        with open(args.out, 'w') as f:
            f.write(table + '\n')
    if args.out_png:
        save_plot(rows, args.out_png, title=f'{args.dtype}, {device}')


def save_plot(rows, path, title):
    """Grouped bars per input size: forward time (left) and peak memory (right)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(row['size'] for row in rows))
    backbones = list(dict.fromkeys(row['backbone'] for row in rows))
    by_key = {(row['backbone'], row['size']): row for row in rows}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(backbones)
    for ax, field, label in ((axes[0], 'ms', 'forward (ms, median)'),
                             (axes[1], 'memory_mib', 'peak memory (MiB)')):
        for i, name in enumerate(backbones):
            values = [by_key[(name, size)][field] if (name, size) in by_key else 0
                      for size in sizes]
            ax.bar([x + i * width for x in range(len(sizes))], values, width, label=name)
        ax.set_xticks([x + width * (len(backbones) - 1) / 2 for x in range(len(sizes))])
        ax.set_xticklabels(sizes)
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f'BoTNet vs ResNet backbones: {title}')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == '__main__':
    main()
