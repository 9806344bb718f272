"""ACT's accuracy/cost trade-off on a trained DETR, the paper's Table 1 in miniature.

    python tools/analysis/act_tradeoff.py CONFIG CKPT [--num-hashes 16 20 24 32]
        [--bootstrap 1000] [--out-dir DIR] [--cfg-options ...]

CONFIG is a DETR config whose encoder self-attention is ``AdaptiveClusteringAttention`` (e.g.
``configs/act/act-detr_r18-dc5_1xb8-3000i_synthetic-shapes.py``); CKPT is a checkpoint of the
plain DETR (it loads strictly, no retraining). For each number of hash rounds L (same bucket
width and seed as the config) and for exact attention, the config's test loop runs over its
test set and reports:

* AP (CocoMetric bbox mAP, and AP50), printed x100 (4.8 for CocoMetric's 0.048); with
  ``--bootstrap B``, a 95% percentile-bootstrap interval of the AP: the test images are
  resampled with replacement B times and COCO AP recomputed exactly on each resample from the
  same per-image predictions, and a paired interval of each ACT row's AP difference to exact
  attention (same resampled images; :mod:`mmdet_detrx.evaluation.bootstrap`);
* encoder attention GFLOPs per image, from the clusters actually found
  (each layer's record hook and ``mmdet_detrx.utils.complexity.act_flops``; exact attention
  counts its N^2 terms);
* mean clusters per head and layer;
* wall time of the whole test loop and of the encoder alone, per image.

Writes ``act_tradeoff.md``, ``act_tradeoff.csv`` and ``act_tradeoff.png`` (AP vs encoder GFLOPs
and vs wall time) to ``--out-dir``.
"""
import argparse
import os
import os.path as osp
import sys
import time
from typing import Dict, List, Optional, Tuple

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmengine.config import DictAction  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from mmdet_detrx.models.layers import resolve_act_layers  # noqa: E402
from mmdet_detrx.tools.common import (act_layers, build_test_runner, exit_status,  # noqa: E402
                                      require_act_layers, write_csv)
from mmdet_detrx.utils.complexity import act_flops  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', help='DETR config with ACT encoder attention')
    parser.add_argument('checkpoint', help='checkpoint of the (plain or ACT) DETR')
    parser.add_argument('--num-hashes', type=int, nargs='+', default=[16, 20, 24, 32],
                        help='hash rounds L to sweep (default 16 20 24 32)')
    parser.add_argument('--bootstrap', type=int, default=0,
                        help='bootstrap resamples for a 95%% AP interval (0: none; e.g. 1000)')
    parser.add_argument('--out-dir', default='work_dirs/act_tradeoff')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, as in tools/test.py')
    return parser.parse_args(argv)


class EncoderMeter:
    """Accumulates ACT-layer FLOPs, clusters and encoder time over a test loop."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.layers = require_act_layers(model, 'the model')
        self.handles = [m.register_record_hook(self._after_layer) for m in self.layers]
        encoder = getattr(model, 'encoder', None)
        if encoder is not None:
            self.handles.append(encoder.register_forward_pre_hook(self._before_encoder))
            self.handles.append(encoder.register_forward_hook(self._after_encoder))
        self.reset()

    def reset(self) -> None:
        self.flops = 0.0
        self.images = 0
        self.cluster_sum = 0.0
        self.cluster_count = 0
        self.encoder_seconds = 0.0
        self._start = None

    def _before_encoder(self, module, args):
        self._start = time.perf_counter()

    def _after_encoder(self, module, args, output):
        self.encoder_seconds += time.perf_counter() - self._start

    def _after_layer(self, module, record):
        flops = act_flops(record, module.embed_dims)
        self.flops += float(flops.sum())
        if module is self.layers[0]:
            self.images += flops.numel()
        if record.num_clusters is not None:
            self.cluster_sum += float(record.num_clusters.float().sum())
            self.cluster_count += record.num_clusters.numel()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def measure_test_loop(self, runner: Runner) -> Dict:
        """Run ``runner``'s test loop once: its AP and AP50 (percent), and per image the ACT
        layers' GFLOPs, mean clusters per head, and the loop's and the encoder's milliseconds."""
        self.reset()
        start = time.perf_counter()
        metrics = runner.test_loop.run()
        seconds = time.perf_counter() - start
        images = max(self.images, 1)
        return dict(
            **ap_keys(metrics),
            encoder_gflops=self.flops / images / 1e9,
            clusters=(self.cluster_sum / self.cluster_count
                      if self.cluster_count else float('nan')),
            ms_per_image=1e3 * seconds / images,
            encoder_ms_per_image=1e3 * self.encoder_seconds / images)


def set_num_hashes(model: torch.nn.Module, num_hashes: Optional[int]) -> None:
    """``None``: exact attention; else ACT with ``num_hashes`` rounds (same r and seed).

    The layer's hash keeps its first rounds (loaded or seeded) and is completed from its seed.
    """
    for module in act_layers(model).values():
        module.use_exact = num_hashes is None
        if num_hashes is not None:
            module.num_hashes = num_hashes


class CocoResultCapture:
    """Keeps the per-image (gt, pred) results the first bbox CocoMetric scored last."""

    def __init__(self, evaluator) -> None:
        from mmdet.evaluation import CocoMetric
        self.metric = next((m for m in evaluator.metrics if isinstance(m, CocoMetric)
                            and 'bbox' in m.metrics), None)
        self.results = None
        if self.metric is not None:
            compute = self.metric.compute_metrics

            def capture(results):
                self.results = list(results)
                return compute(results)

            self.metric.compute_metrics = capture


def image_evals(metric, results: List):
    """The per-image COCO matches of ``results`` (:class:`CocoResultCapture`), for bootstrapping.

    Args:
        metric (CocoMetric): the metric that scored ``results``; its ground-truth file, category
            ids and ``proposal_nums`` are reused, so the AP on all images is the metric's.
        results (list): its per-image ``(gt, pred)`` results.

    Returns:
        :class:`mmdet_detrx.evaluation.bootstrap.CocoImageEvals` over the images of ``results``.
    """
    from mmdet_detrx.evaluation.bootstrap import CocoImageEvals
    gt_api = metric._coco_api
    if gt_api is None:
        raise ValueError('bootstrap needs a CocoMetric with an ann_file')
    cat_ids = metric.cat_ids or gt_api.get_cat_ids(cat_names=metric.dataset_meta['classes'])
    detections = []
    for gt, pred in results:
        boxes = np.asarray(pred['bboxes'], dtype=np.float64).reshape(-1, 4)
        detections += [dict(image_id=gt['img_id'], score=float(score),
                            bbox=[float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                            category_id=cat_ids[int(label)])
                       for (x1, y1, x2, y2), score, label in
                       zip(boxes, pred['scores'], pred['labels'])]
    return CocoImageEvals.from_coco(gt_api, detections, cat_ids=cat_ids,
                                    img_ids=[gt['img_id'] for gt, _ in results],
                                    max_dets=metric.proposal_nums)


def bootstrap_ap(metric, results: List, num_samples: int, seed: int = 0) -> Tuple[float, float]:
    """95% percentile-bootstrap interval of COCO bbox AP (x100) over the images of ``results``.

    Each resample draws ``len(results)`` images with replacement (a repeated image counts
    twice) and recomputes COCO AP exactly (:mod:`mmdet_detrx.evaluation.bootstrap`).
    """
    from mmdet_detrx.evaluation.bootstrap import bootstrap_ap as paired_bootstrap
    row = paired_bootstrap([image_evals(metric, results)], num_samples, seed)['models'][0]
    return 100 * row['AP_low'], 100 * row['AP_high']


def ap_keys(metrics: Dict) -> Dict:
    ap = next((v for k, v in metrics.items() if k.endswith('bbox_mAP')), float('nan'))
    ap50 = next((v for k, v in metrics.items() if k.endswith('bbox_mAP_50')), float('nan'))
    return dict(AP=100 * ap, AP50=100 * ap50)


def run_sweep(runner: Runner, settings: List[Optional[int]], bootstrap: int = 0) -> List[Dict]:
    model = runner.model
    meter = EncoderMeter(model)
    capture = CocoResultCapture(runner.test_loop.evaluator) if bootstrap else None
    rows, evals = [], []
    try:
        for num_hashes in settings:
            set_num_hashes(model, num_hashes)
            rows.append(dict(attention='exact' if num_hashes is None else f'ACT L={num_hashes}',
                             **meter.measure_test_loop(runner)))
            if capture is not None:
                if capture.results is None:
                    raise ValueError('--bootstrap needs a bbox CocoMetric with an ann_file in '
                                     'test_evaluator')
                evals.append(image_evals(capture.metric, capture.results))
        if evals:
            add_paired_intervals(rows, evals, bootstrap)
    finally:
        meter.remove()
        for module in act_layers(model).values():
            module.use_exact = False
    return rows


def add_paired_intervals(rows: List[Dict], evals: List, num_samples: int, seed: int = 0) -> None:
    """Adds 95% bootstrap intervals (x100) of each row's AP and, paired on the same resampled
    images, of its AP difference to the first row (``dAP``: ACT minus exact)."""
    from mmdet_detrx.evaluation.bootstrap import bootstrap_ap as paired_bootstrap
    stats = paired_bootstrap(evals, num_samples, seed)['models']
    for row, stat in zip(rows, stats):
        row['AP_low'], row['AP_high'] = 100 * stat['AP_low'], 100 * stat['AP_high']
        if 'dAP' in stat:
            row['dAP'] = 100 * stat['dAP']
            row['dAP_low'], row['dAP_high'] = 100 * stat['dAP_low'], 100 * stat['dAP_high']


def to_markdown(rows: List[Dict]) -> str:
    interval = 'AP_low' in rows[0]
    lines = ['| attention | AP |' + (' AP 95% CI | ΔAP vs exact (95% CI) |' if interval else '') +
             ' AP50 | encoder attn GFLOPs | clusters/head | ms/image | encoder ms/image |',
             '|---|---|' + ('---|---|' if interval else '') + '---|---|---|---|---|']
    for r in rows:
        clusters = '-' if r['clusters'] != r['clusters'] else f"{r['clusters']:.1f}"
        delta = (f" {r['dAP']:+.1f} ({r['dAP_low']:+.1f} to {r['dAP_high']:+.1f}) |"
                 if 'dAP' in r else ' - |')
        ci = f" {r['AP_low']:.1f}-{r['AP_high']:.1f} |{delta}" if interval else ''
        lines.append(f"| {r['attention']} | {r['AP']:.1f} |{ci} {r['AP50']:.1f} | "
                     f"{r['encoder_gflops']:.4f} | {clusters} | {r['ms_per_image']:.1f} | "
                     f"{r['encoder_ms_per_image']:.1f} |")
    return '\n'.join(lines)


def plot(rows: List[Dict], path: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for ax, key, label in [(axes[0], 'encoder_gflops', 'encoder attention GFLOPs / image'),
                           (axes[1], 'ms_per_image', 'test wall time (ms / image)')]:
        for r in rows:
            marker = 's' if r['attention'] == 'exact' else 'o'
            ax.scatter(r[key], r['AP'], marker=marker, s=50)
            if 'AP_low' in r:  # 95% bootstrap interval
                ax.errorbar(r[key], r['AP'], yerr=[[r['AP'] - r['AP_low']],
                                                    [r['AP_high'] - r['AP']]],
                            fmt='none', capsize=3, alpha=0.6)
            ax.annotate(r['attention'], (r[key], r['AP']), textcoords='offset points',
                        xytext=(4, 4), fontsize=8)
        act_rows = [r for r in rows if r['attention'] != 'exact']
        ax.plot([r[key] for r in act_rows], [r['AP'] for r in act_rows], alpha=0.5)
        ax.set_xlabel(label)
        ax.set_ylabel('AP')
        ax.grid(True, alpha=0.3)
    fig.suptitle('ACT: AP vs cost')
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    runner = build_test_runner(args.config, args.checkpoint, args.cfg_options,
                               osp.join(args.out_dir, 'runner'))
    resolve_act_layers(runner.model)  # per-layer settings (lists) take their layer's entry
    if args.bootstrap < 0:
        raise ValueError('--bootstrap must be >= 0')
    rows = run_sweep(runner, [None] + sorted(args.num_hashes), args.bootstrap)
    runner.call_hook('after_run')
    table = to_markdown(rows)
    print(table)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(osp.join(args.out_dir, 'act_tradeoff.md'), 'w') as f:
        f.write(table + '\n')
    write_csv(rows, osp.join(args.out_dir, 'act_tradeoff.csv'))
    plot(rows, osp.join(args.out_dir, 'act_tradeoff.png'))
    return rows


if __name__ == '__main__':
    sys.exit(exit_status(main()))
