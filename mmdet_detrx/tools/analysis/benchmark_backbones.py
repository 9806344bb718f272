"""Params, FLOPs, forward time and peak memory of backbone + neck: ViT-S / TNT-S vs ResNet-50.

Each entry is what a detector config builds before its heads (batch 1, no gradients):

  R50     mmdet ResNet-50 + FPN (256 channels, 5 levels, strides 4-64: Mask R-CNN's)
  ViT-S   our ViT arch='small' (timm's vit_small_patch16_224) + SimpleFeaturePyramid
          (scales 4, 2, 1, 1/2 + a max-pooled level: the same 5 levels, 256 channels)
  TNT-S   our TNT arch='small' (timm's tnt_s_patch16_224) + the same neck
  ViT-B, TNT-B  the 'base' archs, on request (--models)

Measured per entry, each in a fresh subprocess (so memory is that entry's own):

* params: backbone + neck, in millions;
* FLOPs: mmengine's ``FlopAnalyzer`` (one multiply-accumulate = one FLOP, mmdet's convention),
  counting ``scaled_dot_product_attention`` with the handle ``import mmdet_detrx`` registers
  (``mmdet_detrx.utils.complexity``; mmengine has none, and attention is most of a ViT's cost
  at detection sizes: ``B * heads * N * M * (d_qk + d_v)``);
* time: median (and min) of ``--repeats`` forwards after ``--warmup`` (``common.time_call``),
  wall clock or, with ``--timer cpu``, the process's CPU time summed over its threads (robust
  to other load on a shared machine);
* peak memory: growth of the process's resident set during the forwards over the resident set
  before them (weights and input are allocated before; CPU), or of
  ``torch.cuda.max_memory_allocated`` (CUDA): ``common.PeakMemory``, each model in a fresh
  process.

Example (the numbers in docs/benchmarks.md)::

    python tools/analysis/benchmark_backbones.py --shape 800x1333 --threads 2 --repeats 3 \\
        --timer cpu --out-dir work_dirs/benchmark_backbones
"""
import argparse
import json
import os
import os.path as osp
import sys

import torch

from mmdet_detrx.tools.common import (Column, PeakMemory, add_common_args, add_shape_arg,
                                      machine_line, markdown_table, measure_in_subprocess,
                                      time_call)


RESNET50_FPN = (
    dict(type='ResNet', depth=50, num_stages=4, out_indices=(0, 1, 2, 3), frozen_stages=1,
         norm_cfg=dict(type='BN', requires_grad=True), norm_eval=True, style='pytorch'),
    dict(type='FPN', in_channels=[256, 512, 1024, 2048], out_channels=256, num_outs=5),
)


def _sfp(in_channels):
    return dict(type='SimpleFeaturePyramid', in_channels=in_channels, out_channels=256,
                scale_factors=(4.0, 2.0, 1.0, 0.5), num_outs=5)


MODELS_TO_BENCHMARK = {
    'R50': RESNET50_FPN,
    'ViT-S': (dict(type='ViT', arch='small'), _sfp(384)),
    'TNT-S': (dict(type='TNT', arch='small'), _sfp(384)),
    'ViT-B': (dict(type='ViT', arch='base'), _sfp(768)),
    'TNT-B': (dict(type='TNT', arch='base'), _sfp(640)),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', default=['R50', 'ViT-S', 'TNT-S'],
                        choices=list(MODELS_TO_BENCHMARK))
    add_shape_arg(parser, help='input height and width')
    parser.add_argument('--no-flops', action='store_true', help='skip the FLOP count')
    add_common_args(parser, 'device', 'repeats', 'warmup', 'timer', 'out_dir')
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads')
    parser.add_argument('--single', help=argparse.SUPPRESS)  # internal: one model, print JSON
    return parser.parse_args(argv)


class BackboneNeck(torch.nn.Module):
    """What a detector runs before its heads: ``neck(backbone(x))``."""

    def __init__(self, backbone_cfg, neck_cfg):
        super().__init__()
        from mmdet.registry import MODELS
        self.backbone = MODELS.build(backbone_cfg)
        self.neck = MODELS.build(neck_cfg)

    def forward(self, x):
        return self.neck(self.backbone(x))


def count_flops(model, x):
    from mmengine.analysis import FlopAnalyzer
    analyzer = FlopAnalyzer(model, (x, ))
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    return analyzer.total()


def measure(args, name):
    from mmdet.utils import register_all_modules

    import mmdet_detrx  # noqa: F401  (registers ViT, TNT, SimpleFeaturePyramid)
    register_all_modules(init_default_scope=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = BackboneNeck(*MODELS_TO_BENCHMARK[name]).to(device)
    model.eval()
    x = torch.randn(1, 3, *args.shape, device=device)
    row = dict(model=name, shape=f'{args.shape[0]}x{args.shape[1]}',
               params_m=sum(p.numel() for p in model.parameters()) / 1e6)
    memory = PeakMemory(device)
    memory.start()
    with torch.no_grad():
        timing = time_call(lambda: model(x), repeats=args.repeats, warmup=args.warmup,
                           device=device, clock=args.timer)
    peak = memory.stop()
    row['levels'] = ' '.join(f'{o.shape[-2]}x{o.shape[-1]}' for o in timing.output)
    timing.output = None
    row.update(ms=timing.median_ms, ms_min=1e3 * timing.min, memory_mib=peak / 2**20)
    if not args.no_flops:  # after timing: tracing allocates too
        with torch.no_grad():
            row['gflops'] = count_flops(model, x) / 1e9
    return row


def main(argv=None):
    args = parse_args(argv)
    if args.single:
        print(json.dumps(measure(args, args.single)))
        return
    passthrough = [f'--shape={args.shape[0]}x{args.shape[1]}', f'--repeats={args.repeats}',
                   f'--warmup={args.warmup}', f'--device={args.device}', f'--timer={args.timer}']
    if args.threads:
        passthrough.append(f'--threads={args.threads}')
    if args.no_flops:
        passthrough.append('--no-flops')
    rows = []
    for name in args.models:
        rows.append(measure_in_subprocess(__spec__.name, ['--single', name, *passthrough], name))
        print(f'{name}: {rows[-1]["ms"]:.0f} ms', file=sys.stderr)
    base = next((r for r in rows if r['model'] == 'R50'), None)
    for row in rows:
        if base:
            row['time_vs_r50'] = row['ms'] / base['ms']
            row['memory_vs_r50'] = row['memory_mib'] / base['memory_mib']
    if args.threads:
        torch.set_num_threads(args.threads)
    header = (f'Backbone + neck forward, batch 1, float32, input {args.shape[0]}x{args.shape[1]},'
              f' {machine_line(args.device)}; {args.timer} time, median of {args.repeats} after '
              f'{args.warmup} warm-up; memory = peak growth during the forwards.')
    columns = [Column('model', align='left'), Column('params_m', 'params (M)', '{:.2f}'),
               Column('gflops', 'GFLOPs', '{:.1f}'), Column('ms', 'forward (ms)', '{:.0f}'),
               Column('ms_min', 'min (ms)', '{:.0f}'), Column('time_vs_r50', 'time / R50',
                                                              '{:.2f}x'),
               Column('memory_mib', 'peak memory (MiB)', '{:.0f}'),
               Column('memory_vs_r50', 'memory / R50', '{:.2f}x'),
               Column('levels', 'output levels (HxW)', align='left')]
    table = header + '\n\n' + markdown_table(rows, columns)
    print(table)
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(osp.join(args.out_dir, 'benchmark_backbones.md'), 'w') as f:
            f.write(table + '\n')
        with open(osp.join(args.out_dir, 'benchmark_backbones.json'), 'w') as f:
            json.dump(rows, f, indent=1)


if __name__ == '__main__':
    sys.exit(main())
