"""COCO bbox AP of several models' results on one test set, with paired bootstrap intervals.

    python tools/analysis/compare_ap.py ANN_FILE RESULT_JSON [RESULT_JSON ...]
        [--names NAME ...] [--bootstrap 1000] [--seed 0] [--confidence 0.95]
        [--max-dets 100 300 1000] [--cat-ids ID ...] [--out-dir DIR]

ANN_FILE is the COCO ground truth the models were tested on (CocoMetric's ``ann_file``); each
RESULT_JSON a COCO result list, what CocoMetric writes to ``{outfile_prefix}.bbox.json``
(``tools/test.py CONFIG CKPT --cfg-options test_evaluator.outfile_prefix=work_dirs/x/model``).
Only JSON is read: loading a file never runs code from it.

For every model: AP and AP50 on all images (x100; CocoMetric's ``bbox_mAP`` and
``bbox_mAP_50``: COCOeval reads AP at 100 detections per image and category, AP50 at the third
of ``--max-dets``, CocoMetric's ``proposal_nums``), and with ``--bootstrap B`` their 95%
percentile-bootstrap intervals over B resamples of the images. Every model is scored on the same resamples, so for each model after
the first the table also gives ΔAP (it minus the first), the interval of that paired difference
and P(ΔAP>0), the fraction of resamples where it beats the first. An interval of ΔAP that
contains 0 means the difference is within what resampling the test images produces.

pycocotools matches each model's detections once; resamples re-accumulate the matches in numpy
(:mod:`mmdet_detrx.evaluation.bootstrap`, equal to COCOeval on the resampled set), so 1000
resamples of a few thousand images take seconds. Writes ``compare_ap.md`` and
``compare_ap.csv`` to ``--out-dir``.
"""
import argparse
import json
import os
import os.path as osp
import sys
import time
from typing import Dict, List


from mmdet_detrx.evaluation.bootstrap import (COCO_METRIC_MAX_DETS, STATS0_MAX_DET,
                                              CocoImageEvals, bootstrap_ap)
from mmdet_detrx.tools.common import (Column, add_common_args, exit_status, markdown_table,
                                      write_csv)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('ann_file', help='COCO ground-truth JSON the models were tested on')
    parser.add_argument('results', nargs='+',
                        help='COCO result JSONs (CocoMetric: {outfile_prefix}.bbox.json); the '
                        'first is the reference of the differences')
    parser.add_argument('--names', nargs='+', default=None,
                        help='a name per result file (default: the file names)')
    parser.add_argument('--bootstrap', type=int, default=1000,
                        help='bootstrap resamples (default 1000; 0: AP on all images only)')
    parser.add_argument('--confidence', type=float, default=0.95,
                        help='coverage of the percentile intervals (default 0.95)')
    parser.add_argument('--max-dets', type=int, nargs=3, default=list(COCO_METRIC_MAX_DETS),
                        help='COCOeval maxDets, CocoMetric\'s proposal_nums: AP is read at 100, '
                        'AP50 at the third (default 100 300 1000)')
    parser.add_argument('--cat-ids', type=int, nargs='+', default=None,
                        help='categories to score (default: all of ANN_FILE)')
    add_common_args(parser, 'seed', 'out_dir')
    args = parser.parse_args(argv)
    if args.names is not None and len(args.names) != len(args.results):
        parser.error(f'{len(args.names)} --names for {len(args.results)} result files')
    if args.bootstrap < 0:
        parser.error('--bootstrap must be >= 0')
    if not 0 < args.confidence < 1:
        parser.error('--confidence must lie in (0, 1)')
    if min(args.max_dets) < 1:
        parser.error(f'--max-dets must be positive, got {args.max_dets}')
    if STATS0_MAX_DET not in args.max_dets:
        # COCOeval.summarize reads AP (stats[0]) at exactly 100 detections and reports -1
        # without that limit: both models would print AP -100 and "not distinguishable"
        parser.error(f'--max-dets must include {STATS0_MAX_DET}: AP (COCOeval stats[0], '
                     f"CocoMetric's bbox_mAP) is read at {STATS0_MAX_DET} detections per image "
                     f'and category, and is undefined (-1) without it; got {args.max_dets}, e.g. '
                     f'--max-dets {STATS0_MAX_DET} 300 1000')
    return args


def default_name(path: str) -> str:
    name = osp.basename(path)
    for suffix in ('.bbox.json', '.json'):
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


def load_results(path: str) -> List[Dict]:
    with open(path) as f:
        results = json.load(f)
    if not isinstance(results, list):
        raise ValueError(f'{path}: expected a COCO result list (CocoMetric\'s .bbox.json), got '
                         f'a JSON {type(results).__name__}')
    return results


def compare(args) -> Dict:
    """Per-model rows (x100) and the run's description."""
    names = args.names or [default_name(p) for p in args.results]
    with open(args.ann_file) as f:
        dataset = json.load(f)
    evals = [CocoImageEvals.from_coco(dataset, load_results(path), cat_ids=args.cat_ids,
                                      max_dets=args.max_dets) for path in args.results]
    start = time.perf_counter()
    if args.bootstrap:
        models = bootstrap_ap(evals, num_samples=args.bootstrap, seed=args.seed,
                              confidence=args.confidence, names=names)['models']
    else:
        models = []
        for name, model in zip(names, evals):
            models.append(dict(name=name, **dict(zip(('AP', 'AP50'), model.ap()))))
            if models[1:]:
                models[-1]['dAP'] = models[-1]['AP'] - models[0]['AP']
                models[-1]['dAP50'] = models[-1]['AP50'] - models[0]['AP50']
    seconds = time.perf_counter() - start
    rows = [{key: (100 * value if isinstance(value, float) and not key.startswith('p_')
                   else value) for key, value in model.items()} for model in models]
    return dict(rows=rows, num_images=evals[0].num_images, seconds=seconds)


def _interval(row, key):
    if f'{key}_low' not in row:
        return None
    return f'[{row[f"{key}_low"]:.2f}, {row[f"{key}_high"]:.2f}]'


def to_markdown(rows: List[Dict], confidence: float) -> str:
    ci = f'{100 * confidence:g}% CI'
    table_rows = [dict(row, AP_ci=_interval(row, 'AP'), AP50_ci=_interval(row, 'AP50'),
                       dAP_ci=_interval(row, 'dAP')) for row in rows]
    columns = [Column('name', 'model', align='left'), Column('AP', 'AP', '{:.2f}'),
               Column('AP_ci', f'AP {ci}'), Column('AP50', 'AP50', '{:.2f}'),
               Column('AP50_ci', f'AP50 {ci}'), Column('dAP', 'ΔAP', '{:+.2f}'),
               Column('dAP_ci', f'ΔAP {ci}'), Column('p_dAP_positive', 'P(ΔAP>0)', '{:.3f}')]
    if 'AP_low' not in rows[0]:
        columns = [c for c in columns if c.key in ('name', 'AP', 'AP50', 'dAP')]
    return markdown_table(table_rows, columns)


def verdicts(rows: List[Dict], confidence: float) -> List[str]:
    """One plain sentence per model after the first: is ΔAP beyond resampling noise?"""
    lines = []
    for row in rows[1:]:
        if 'dAP_low' not in row:
            continue
        if row['dAP_low'] > 0 or row['dAP_high'] < 0:
            verdict = (f'{"higher" if row["dAP_low"] > 0 else "lower"} than {rows[0]["name"]} '
                       f'beyond resampling noise (the {100 * confidence:g}% interval excludes 0)')
        else:
            verdict = (f'not distinguishable from {rows[0]["name"]} (the {100 * confidence:g}% '
                       'interval contains 0)')
        lines.append(f'{row["name"]}: ΔAP {row["dAP"]:+.2f} {_interval(row, "dAP")}, '
                     f'P(ΔAP>0) {row["p_dAP_positive"]:.3f}: {verdict}.')
    return lines


def main(argv=None):
    args = parse_args(argv)
    result = compare(args)
    rows = result['rows']
    header = (f'{args.ann_file}: {result["num_images"]} images, x100, maxDets '
              f'{sorted(args.max_dets)}' + (f'; {args.bootstrap} paired bootstrap resamples, seed '
                                   f'{args.seed} ({result["seconds"]:.1f} s)'
                                   if args.bootstrap else ''))
    text = '\n\n'.join([header, to_markdown(rows, args.confidence),
                        *(['\n'.join(verdicts(rows, args.confidence))] if len(rows) > 1 and
                          args.bootstrap else [])])
    print(text)
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        write_csv(rows, osp.join(args.out_dir, 'compare_ap.csv'))
        with open(osp.join(args.out_dir, 'compare_ap.md'), 'w') as f:
            f.write(text + '\n')
    return rows


if __name__ == '__main__':
    sys.exit(exit_status(main()))
