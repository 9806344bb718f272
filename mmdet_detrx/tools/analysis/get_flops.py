"""FLOPs of any detector on real images; ACT encoder layers counted from their actual clusters.

    python tools/analysis/get_flops.py CONFIG [CKPT] [--num-images N] [--shape H W]
        [--cfg-options ...] [--out-dir DIR] [--out-json FILE]

mmdet's ``tools/analysis_tools/get_flops.py`` role: images come from the config's val dataloader
(batch size 1); the model is counted with mmengine's ``FlopAnalyzer`` (one multiply-accumulate =
one FLOP, mmdet's convention), which counts our deformable attention op through the handle
``import mmdet_detrx`` registers (``mmdet_detrx.utils.complexity``). Reported for every model:
parameters, total GFLOPs, GFLOPs per operator and the operators the analyzer could not count.

ACT's cost depends on the image, so when the model has ``AdaptiveClusteringAttention`` layers
they are counted from the clusters each layer actually found (a record hook on each layer,
``record_act_forwards``, and the ACT formula ``mmdet_detrx.utils.complexity.act_flops``, next to
the MSDA and SDPA formulas the analyzer uses) instead of by the analyzer, which traces the
exact path: ``total = analyzer(model with exact attention) - analyzer(ACT layers) + ACT layers``.
Exact attention is counted with its N^2 terms. Then the report adds the mean clusters per layer
(over images and heads), mean tokens, the encoder attention GFLOPs (exact and ACT) and the total
GFLOPs (exact and ACT). ``--shape H W`` resizes each image to H x W. ``--out-dir`` writes the
report as ``flops.md`` and ``flops.json``; ``--out-json FILE`` (the older flag) only the JSON.
"""
import argparse
import json
import os
import os.path as osp
import sys
from functools import partial
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from mmengine.analysis import FlopAnalyzer
from mmengine.config import DictAction
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import init_default_scope
from mmengine.runner import Runner, load_checkpoint

from mmdet_detrx.models.layers import act_exact_mode, record_act_forwards
from mmdet_detrx.tools.common import (Column, act_layers, add_common_args, add_shape_arg,
                                      exit_status, load_config, markdown_table)
from mmdet_detrx.utils.complexity import act_flops


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', nargs='?', default=None,
                        help='checkpoint (clusters depend on the weights; random if omitted)')
    parser.add_argument('--num-images', type=int, default=20,
                        help='images of the val set to average over (default 20)')
    add_shape_arg(parser, default=None, help='resize every image to this height and width')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, as in tools/test.py')
    add_common_args(parser, 'device', 'out_dir')
    parser.add_argument('--out-json', default=None, help='also write the report (JSON) here')
    args = parser.parse_args(argv)
    if args.num_images < 1:
        parser.error(f'--num-images must be at least 1, got {args.num_images}')
    return args


def build_model_and_loader(config, checkpoint=None, cfg_options=None, device='cpu'):
    cfg = load_config(config, cfg_options, weights_from_checkpoint=True)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    from mmdet.registry import MODELS
    cfg.model.pop('init_cfg', None)
    model = MODELS.build(cfg.model)
    if checkpoint:
        load_checkpoint(model, checkpoint, map_location='cpu')
    model = revert_sync_batchnorm(model).to(device).eval()
    loader_cfg = cfg.val_dataloader.copy()
    loader_cfg.update(batch_size=1, num_workers=0, persistent_workers=False)
    loader_cfg.pop('batch_sampler', None)
    return cfg, model, Runner.build_dataloader(loader_cfg)


def preprocess(model, data_batch, shape=None):
    data = model.data_preprocessor(data_batch, False)
    if shape is not None:
        data['inputs'] = F.interpolate(data['inputs'], size=tuple(shape), mode='bilinear',
                                       align_corners=False)
        for sample in data['data_samples']:
            sample.set_metainfo(dict(batch_input_shape=tuple(shape), img_shape=tuple(shape),
                                     pad_shape=tuple(shape)))
    return data


def _flops(layer, records) -> float:
    """FLOPs of a layer's last forward (the one the image ran through it)."""
    return float(act_flops(records[-1], layer.embed_dims).sum())


@torch.no_grad()
def count_image(model, data) -> Dict:
    """FLOPs of one preprocessed image, with exact and with ACT encoder attention."""
    layers = act_layers(model)
    forward = model.forward
    model.forward = partial(forward, data_samples=data['data_samples'], mode='tensor')
    try:
        with act_exact_mode(model):
            analyzer = FlopAnalyzer(model, inputs=(data['inputs'], ))
            analyzer.unsupported_ops_warnings(False)
            analyzer.uncalled_modules_warnings(False)
            analyzer_total = analyzer.total()
            by_module = analyzer.by_module()
            by_operator = dict(analyzer.by_operator())
            unsupported = dict(analyzer.unsupported_ops())
            with record_act_forwards(model) as exact_forwards:
                model(data['inputs'])
        with record_act_forwards(model) as act_forwards:
            model(data['inputs'])
    finally:
        model.forward = forward
    exact = {name: _flops(layers[name], records) for name, records in exact_forwards.items()}
    act = {name: _flops(layers[name], records) for name, records in act_forwards.items()}
    clusters = {name: records[-1].num_clusters.float().mean().item()
                for name, records in act_forwards.items()}
    tokens = {name: records[-1].num_queries.float().mean().item()
              for name, records in act_forwards.items()}
    rest = analyzer_total - sum(by_module.get(name, 0) for name in layers)
    return dict(rest=rest, exact=exact, act=act, clusters=clusters, tokens=tokens,
                by_operator=by_operator, unsupported=unsupported)


def summarize(records: List[Dict], params: int) -> Dict:
    names = list(records[0]['act'])
    giga = 1e9
    layers = []
    for name in names:
        layers.append(dict(
            layer=name,
            tokens=float(np.mean([r['tokens'][name] for r in records])),
            clusters=float(np.mean([r['clusters'][name] for r in records])),
            exact_gflops=float(np.mean([r['exact'][name] for r in records])) / giga,
            act_gflops=float(np.mean([r['act'][name] for r in records])) / giga))
    rest = float(np.mean([r['rest'] for r in records])) / giga
    encoder_exact = sum(layer['exact_gflops'] for layer in layers)
    encoder_act = sum(layer['act_gflops'] for layer in layers)
    operators = sorted({op for r in records for op in r['by_operator']})
    # With ACT layers these are the analyzer's counts of the exact path.
    operator_gflops = {op: float(np.mean([r['by_operator'].get(op, 0) for r in records])) / giga
                       for op in operators}
    unsupported = {}
    for record in records:
        for op, count in record['unsupported'].items():
            unsupported[op] = max(unsupported.get(op, 0), count)
    return dict(num_images=len(records), params_m=params / 1e6, layers=layers,
                encoder_attention_gflops=dict(exact=encoder_exact, act=encoder_act),
                total_gflops=dict(exact=rest + encoder_exact, act=rest + encoder_act),
                operator_gflops=operator_gflops, unsupported_ops=unsupported)


def format_report(report: Dict) -> str:
    lines = [f"images: {report['num_images']}, params: {report['params_m']:.2f} M"]
    total = report['total_gflops']
    if report['layers']:
        lines.append(markdown_table(report['layers'], [
            Column('layer', align='left'), Column('tokens', fmt='{:.0f}'),
            Column('clusters', 'mean clusters/head', '{:.1f}'),
            Column('exact_gflops', 'exact GFLOPs', '{:.4f}'),
            Column('act_gflops', 'ACT GFLOPs', '{:.4f}')]))
        enc = report['encoder_attention_gflops']
        lines.append(f"encoder attention GFLOPs: exact {enc['exact']:.4f}, ACT {enc['act']:.4f}")
        lines.append(f"total GFLOPs: exact {total['exact']:.3f}, ACT {total['act']:.3f}")
    else:
        lines.append(f"total GFLOPs: {total['exact']:.3f}")
    operators = sorted(report['operator_gflops'].items(), key=lambda item: -item[1])
    lines.append(markdown_table([dict(op=op, gflops=gflops) for op, gflops in operators], [
        Column('op', 'operator', align='left'), Column('gflops', 'GFLOPs', '{:.4f}')]))
    if report['unsupported_ops']:
        lines.append('not counted (no FLOP handle): ' + ', '.join(
            f'{op} x{count}' for op, count in sorted(report['unsupported_ops'].items())))
    return '\n'.join(lines)


def main(argv=None):
    args = parse_args(argv)
    _, model, loader = build_model_and_loader(args.config, args.checkpoint, args.cfg_options,
                                              args.device)
    records = []
    for index, data_batch in enumerate(loader):
        if index == args.num_images:
            break
        records.append(count_image(model, preprocess(model, data_batch, args.shape)))
    if not records:
        raise ValueError('the val dataloader yielded no image')
    params = sum(p.numel() for p in model.parameters())
    report = summarize(records, params)
    text = format_report(report)
    print(text)
    json_paths = [args.out_json] if args.out_json else []
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(osp.join(args.out_dir, 'flops.md'), 'w') as f:
            f.write(text + '\n')
        json_paths.append(osp.join(args.out_dir, 'flops.json'))
    for path in json_paths:
        with open(path, 'w') as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == '__main__':
    sys.exit(exit_status(main()))
