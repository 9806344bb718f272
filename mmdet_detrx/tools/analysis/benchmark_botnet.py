"""Forward time and peak memory of BoTNet vs the ResNet it modifies, same run, same input.

Every (backbone, input size) pair is measured in a fresh subprocess so that peak memory is
that pair's own (``measure_in_subprocess``): the growth over the forward passes of the
process's resident set on CPU, of ``torch.cuda.max_memory_allocated`` on CUDA, over what was
held before them (weights and input: ``PeakMemory``). Timing, machine line, table and chart are
``mmdet_detrx.tools.common``'s (``time_call``, ``machine_line``, ``markdown_table``,
``bar_chart``: linear axes, each bar's ratio to the baseline ResNet on it).

Example (CPU, the numbers in docs/botnet.md)::

    python tools/analysis/benchmark_botnet.py --sizes 1024x1024 800x1333 --repeat 5 \
        --out work_dirs/benchmark_botnet.md
"""
import argparse
import json
import sys

import torch

from mmdet_detrx.tools.common import (DTYPES, Column, PeakMemory, add_common_args, bar_chart,
                                      describe_machine, machine_line, markdown_table,
                                      measure_in_subprocess, parse_hw, time_call)


BACKBONES = {
    'R50': dict(type='ResNet', depth=50),
    'BoT50': dict(type='BoTNet', depth=50),
    'R101': dict(type='ResNet', depth=101),
    'BoT101': dict(type='BoTNet', depth=101),
}
TABLE = [Column('backbone', align='left'), Column('params_m', 'params (M)', '{:.2f}'),
         Column('size', 'input HxW', align='left'), Column('ms', 'forward (ms)', '{:.0f}'),
         Column('ms_min', 'min (ms)', '{:.0f}'),
         Column('memory_mib', 'peak memory (MiB)', '{:.0f}'),
         Column('memory_vs_resnet', 'memory x ResNet', '{:.2f}x')]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--backbones', nargs='+', default=['R50', 'BoT50'],
                        choices=sorted(BACKBONES))
    parser.add_argument('--sizes', nargs='+', type=parse_hw, default=['1024x1024', '800x1333'],
                        help='input sizes as HxW')
    parser.add_argument('--batch-size', type=int, default=1)
    add_common_args(parser, 'repeats', 'warmup', 'device', repeats=5)
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
    args = parser.parse_args(argv)
    args.sizes = [parse_hw(s) if isinstance(s, str) else s for s in args.sizes]  # the default
    return args


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
    autocast = torch.autocast(device.type, dtype=DTYPES[args.dtype],
                              enabled=args.dtype != 'float32')

    def forward():
        model(x)  # outputs freed on return: one forward's activations at a time

    memory = PeakMemory(device)
    memory.start()
    with torch.no_grad(), autocast:
        timing = time_call(forward, repeats=args.repeats, warmup=args.warmup, device=device)
    peak = memory.stop()
    return dict(backbone=name, size=f'{size[0]}x{size[1]}', params_m=num_params / 1e6,
                ms=timing.median_ms, ms_min=1e3 * timing.min, memory_mib=peak / 2**20)


def main(argv=None):
    args = parse_args(argv)
    if args.single:
        print(json.dumps(measure(args, args.single[0], parse_hw(args.single[1]))))
        return
    parse_chunk(args.query_chunk_size)  # validate before spawning anything
    passthrough = [f'--batch-size={args.batch_size}', f'--repeats={args.repeats}',
                   f'--warmup={args.warmup}', f'--device={args.device}', f'--dtype={args.dtype}',
                   f'--query-chunk-size={args.query_chunk_size}']
    if args.threads:
        passthrough.append(f'--threads={args.threads}')
    rows = []
    for height, width in args.sizes:
        for name in args.backbones:
            rows.append(measure_in_subprocess(
                __spec__.name, ['--single', name, f'{height}x{width}', *passthrough],
                f'{name} {height}x{width}'))
            print(f'{name} {height}x{width}: {rows[-1]["ms"]:.0f} ms', file=sys.stderr)

    memory = {(row['backbone'], row['size']): row['memory_mib'] for row in rows}
    for row in rows:
        resnet = memory.get((resnet_of(row['backbone']), row['size']))
        if resnet:
            row['memory_vs_resnet'] = row['memory_mib'] / resnet
    if args.threads:
        torch.set_num_threads(args.threads)  # for machine_line's thread count
    machine = machine_line(args.device)
    table = '\n'.join([
        f'Backbone forward, batch {args.batch_size}, {args.dtype}, {machine}; median of '
        f'{args.repeats} after {args.warmup} warm-up; memory = peak growth during the forward; '
        f'BoT query_chunk_size={args.query_chunk_size}; x ResNet: memory over the ResNet of the '
        'same depth at the same size.', '', markdown_table(rows, TABLE)])
    print(table)
    if args.out:
        with open(args.out, 'w') as f:
            f.write(table + '\n')
    if args.out_png:
        info = describe_machine(args.device)
        device = info.get('gpu') or f'CPU, {info["torch_threads"]} threads'
        save_plot(rows, args.out_png, title=f'{args.dtype}, {device}')


def resnet_of(backbone):
    """The ResNet a BoTNet modifies (same depth): 'BoT50' -> 'R50'."""
    return backbone.replace('BoT', 'R')


def save_plot(rows, path, title):
    """Grouped bars per input size, forward time (left) and peak memory (right), each bar
    labelled with its ratio to the baseline ResNet's (R50 if measured, else the first)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(row['size'] for row in rows))
    backbones = list(dict.fromkeys(row['backbone'] for row in rows))
    resnets = [name for name in backbones if not name.startswith('BoT')]
    baseline = 'R50' if 'R50' in resnets else next(iter(resnets), None)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, field, label in ((axes[0], 'ms', 'forward (ms, median)'),
                             (axes[1], 'memory_mib', 'peak memory (MiB)')):
        values = {(row['size'], row['backbone']): row[field] for row in rows}
        bar_chart(ax, sizes, backbones, values, baseline=baseline, ratio='relative',
                  ylabel=label, title=f'ratio to {baseline}' if baseline else '',
                  value_fmt='{:.0f}')
    fig.suptitle(f'BoTNet vs ResNet backbones: {title}', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == '__main__':
    sys.exit(main())
