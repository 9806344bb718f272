"""Calibrate ACT's bucket width per encoder layer of a trained DETR, then score the result.

    python tools/analysis/calibrate_act.py CONFIG CKPT [--target-error E | --target-clusters K]
        [--num-images N] [--num-hashes L ...] [--relative] [--out-dir DIR] [--skip-eval]
        [--cfg-options ...]

CONFIG is a DETR config whose encoder self-attention is ``AdaptiveClusteringAttention``; CKPT its
(plain or ACT) checkpoint. Method (docs/act.md, "Calibration"):

1. The **exact** model (every ACT layer in exact mode) runs on the first ``--num-images`` images of
   the config's test set; each encoder layer's inputs (query, query_pos, key_padding_mask) are
   recorded.
2. Per layer and per number of rounds L in ``--num-hashes`` (default: the config's), the layer's
   relative attention-output error against its exact attention and its clusters per head are
   measured as a function of r on those inputs, and the coarsest r meeting the target is kept
   (:func:`mmdet_detrx.models.layers.calibrate_layer`): ``--target-error E`` keeps the error
   below E (default 0.05), ``--target-clusters K`` the mean clusters per head at most K.
   ``--relative`` calibrates the scale-free ``relative_bucket_width`` instead of ``bucket_width``.
3. Per layer, the setting (L, r) with the fewest clusters that meets an error target (with
   ``--target-clusters``: the lowest error) is chosen, and the ``--cfg-options`` and config
   snippet that select it are printed.
4. Unless ``--skip-eval``: the config's test loop runs with exact attention, with the config's
   own ACT setting and with the calibrated one, reporting AP and AP50 (x100, as
   ``act_tradeoff.py``), encoder attention GFLOPs (from the clusters actually found), clusters
   per head and wall time per image (whole model, encoder).

Writes ``calibrate_act.json`` and ``calibrate_act.md`` to ``--out-dir``.
"""
import argparse
import json
import os
import os.path as osp
import sys
from typing import Dict, List, Optional

import torch
from mmengine.config import DictAction

from mmdet_detrx.models.layers import act_exact_mode, calibrate_layer, resolve_act_layers
from mmdet_detrx.tools.analysis import act_tradeoff
from mmdet_detrx.tools.common import build_test_runner, exit_status, require_act_layers

_ATTN_KEY = 'model.encoder.layer_cfg.self_attn_cfg'


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', help='DETR config with ACT encoder attention')
    parser.add_argument('checkpoint', help='checkpoint of the (plain or ACT) DETR')
    target = parser.add_mutually_exclusive_group()
    target.add_argument('--target-error', type=float, default=None,
                        help='relative attention-output error to stay below (default 0.05)')
    target.add_argument('--target-clusters', type=float, default=None,
                        help='mean clusters per head to stay at or below, instead')
    parser.add_argument('--num-images', type=int, default=8,
                        help='test images whose encoder inputs calibrate (default 8)')
    parser.add_argument('--num-hashes', type=int, nargs='+', default=None,
                        help="hash rounds L to consider (default: the config's)")
    parser.add_argument('--relative', action='store_true',
                        help='calibrate the scale-free relative_bucket_width')
    parser.add_argument('--skip-eval', action='store_true',
                        help='only calibrate; do not run the test loop')
    parser.add_argument('--out-dir', default='work_dirs/calibrate_act')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, as in tools/test.py')
    args = parser.parse_args(argv)
    if args.target_error is None and args.target_clusters is None:
        args.target_error = 0.05
    if args.num_images < 1:
        parser.error('--num-images must be >= 1')
    return args


@torch.no_grad()
def record_layer_inputs(model, layers: List[torch.nn.Module], dataloader,
                        num_images: int) -> List[List[tuple]]:
    """Per layer, the (query, query_pos, key_padding_mask) batches of the exact model."""
    recorded = [[] for _ in layers]

    def hook(index):
        def record(module, args, kwargs):
            query = kwargs.get('query', args[0] if args else None)
            pos = kwargs.get('query_pos')
            mask = kwargs.get('key_padding_mask')
            recorded[index].append(tuple(None if t is None else t.detach().clone()
                                         for t in (query, pos, mask)))
        return record

    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, m in enumerate(layers)]
    seen = 0
    try:
        with act_exact_mode(model):
            for data_batch in dataloader:
                model.test_step(data_batch)
                seen += len(data_batch['inputs'])
                if seen >= num_images:
                    break
    finally:
        for handle in handles:
            handle.remove()
    return recorded


def choose(results, by_error: bool):
    """The coarsest result (fewest clusters, then fewer rounds) or the most accurate one."""
    if by_error:
        return min(results, key=lambda r: (r.clusters, r.num_hashes))
    return min(results, key=lambda r: (r.error, r.clusters))


def format_value(values: List):
    if all(v == values[0] for v in values):
        return values[0]
    return values


def snippets(chosen, relative: bool) -> Dict[str, str]:
    widths = [r.bucket_width for r in chosen]
    rounds = [r.num_hashes for r in chosen]
    width_key = 'relative_bucket_width' if relative else 'bucket_width'
    width, num_hashes = format_value(widths), format_value(rounds)

    def option(key, value):
        text = str(value).replace(' ', '')
        return f'{_ATTN_KEY}.{key}="{text}"' if isinstance(value, list) else \
            f'{_ATTN_KEY}.{key}={text}'

    cfg_options = '--cfg-options ' + ' '.join([option(width_key, width),
                                               option('num_hashes', num_hashes)])
    config = ('model = dict(encoder=dict(layer_cfg=dict(self_attn_cfg=dict(\n'
              f"    type='AdaptiveClusteringAttention', num_hashes={num_hashes!r},\n"
              f'    {width_key}={width!r}))))')
    # One value for every layer (the finest width, the most rounds): each layer is at least as
    # fine as its own calibrated setting, and no per-layer list has to be resolved.
    uniform = '--cfg-options ' + ' '.join([option(width_key, min(widths)),
                                           option('num_hashes', max(rounds))])
    return dict(cfg_options=cfg_options, config=config, uniform_cfg_options=uniform)


def apply(layers, chosen, relative: bool) -> None:
    for module, result in zip(layers, chosen):
        module.num_hashes = result.num_hashes
        if relative:
            module.relative_bucket_width = result.bucket_width
        else:
            module.relative_bucket_width = None
            module.bucket_width = result.bucket_width


def evaluate(runner, layers, settings) -> List[Dict]:
    """Test loop per named setting: AP, encoder GFLOPs, clusters, times."""
    meter = act_tradeoff.EncoderMeter(runner.model)
    rows = []
    try:
        for name, exact, setup in settings:
            if setup is not None:
                setup()
            for module in layers:
                module.use_exact = exact
            rows.append(dict(setting=name, **meter.measure_test_loop(runner)))
    finally:
        meter.remove()
        for module in layers:
            module.use_exact = False
    return rows


def to_markdown(per_layer, eval_rows: Optional[List[Dict]], target: str, snippet) -> str:
    lines = [f'target: {target}', '', '| layer | L | width | rel. error | clusters/head |',
             '|---|---|---|---|---|']
    for index, result in enumerate(per_layer):
        lines.append(f'| {index} | {result.num_hashes} | {result.bucket_width:.4g}'
                     f"{' (relative)' if result.relative else ''} | {100 * result.error:.2f}% | "
                     f'{result.clusters:.1f} |')
    lines += ['', snippet['cfg_options'], '', snippet['config'], '',
              'one setting for all layers (finest width, most rounds):',
              snippet['uniform_cfg_options']]
    if eval_rows:
        lines += ['', '| setting | AP | AP50 | encoder attn GFLOPs | clusters/head | ms/image '
                  '| encoder ms/image |', '|---|---|---|---|---|---|---|']
        for r in eval_rows:
            clusters = '-' if r['clusters'] != r['clusters'] else f"{r['clusters']:.1f}"
            lines.append(f"| {r['setting']} | {r['AP']:.1f} | {r['AP50']:.1f} | "
                         f"{r['encoder_gflops']:.4f} | {clusters} | {r['ms_per_image']:.1f} | "
                         f"{r['encoder_ms_per_image']:.1f} |")
    return '\n'.join(lines)


def main(argv=None):
    args = parse_args(argv)
    runner = build_test_runner(args.config, args.checkpoint, args.cfg_options,
                               osp.join(args.out_dir, 'runner'))
    model = runner.model
    resolve_act_layers(model)
    layers = require_act_layers(model, args.config)
    original = [(m.num_hashes, m.bucket_width, m.relative_bucket_width) for m in layers]
    model.eval()
    recorded = record_layer_inputs(model, layers, runner.test_dataloader, args.num_images)

    by_error = args.target_clusters is None
    per_layer = []
    for index, (module, batches) in enumerate(zip(layers, recorded)):
        candidates = args.num_hashes or [module.num_hashes]
        results = []
        for num_hashes in candidates:
            try:
                results.append(calibrate_layer(
                    module, batches, target_error=args.target_error,
                    target_clusters=args.target_clusters, relative=args.relative,
                    num_hashes=num_hashes))
            except ValueError as error:
                if len(candidates) == 1:
                    raise ValueError(f'encoder layer {index}: {error}') from error
                print(f'layer {index}, L={num_hashes}: {error}')
        if not results:
            raise ValueError(f'encoder layer {index}: no setting meets the target')
        best = choose(results, by_error)
        # The snippet carries 6 significant digits: evaluate exactly what it selects.
        best.bucket_width = float(f'{best.bucket_width:.6g}')
        per_layer.append(best)
    target = (f'relative attention-output error < {args.target_error}' if by_error else
              f'at most {args.target_clusters} clusters per head')
    snippet = snippets(per_layer, args.relative)

    eval_rows = None
    if not args.skip_eval:
        def restore():
            for module, (num_hashes, width, relative) in zip(layers, original):
                module.num_hashes = num_hashes
                module.bucket_width = width
                module.relative_bucket_width = relative

        config_name = ', '.join(sorted({
            f'L={n}, ' + (f'rho={rel}' if rel is not None else f'r={w}')
            for n, w, rel in original}))
        eval_rows = evaluate(runner, layers, [
            ('exact', True, None),
            (f'ACT config ({config_name})', False, restore),
            ('ACT calibrated', False, lambda: apply(layers, per_layer, args.relative)),
        ])
    runner.call_hook('after_run')
    apply(layers, per_layer, args.relative)

    table = to_markdown(per_layer, eval_rows, target, snippet)
    print(table)
    if any(isinstance(v, list) for v in (format_value([r.bucket_width for r in per_layer]),
                                         format_value([r.num_hashes for r in per_layer]))):
        print('\nPer-layer lists are picked by each layer index: DETRX resolves them when it '
              'builds the encoder; in Python, call mmdet_detrx.models.layers.'
              'resolve_act_layers(model) after building.')
    os.makedirs(args.out_dir, exist_ok=True)
    report = dict(target=target, num_images=args.num_images, relative=args.relative,
                  layers=[dict(layer=i, num_hashes=r.num_hashes, bucket_width=r.bucket_width,
                               error=r.error, clusters=r.clusters, trials=r.trials)
                          for i, r in enumerate(per_layer)],
                  **snippet, evaluation=eval_rows)
    with open(osp.join(args.out_dir, 'calibrate_act.json'), 'w') as f:
        json.dump(report, f, indent=1)
    with open(osp.join(args.out_dir, 'calibrate_act.md'), 'w') as f:
        f.write(table + '\n')
    return report


if __name__ == '__main__':
    sys.exit(exit_status(main()))
