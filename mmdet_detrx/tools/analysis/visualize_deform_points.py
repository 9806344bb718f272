"""Draw where a Deformable DETR / DINO decoder query looks: its deformable sampling points.

For the top-scoring queries (or ``--query-ids``) of the decoder's last layer, each panel shows the
image, the query's predicted box and reference point, and the points its last cross-attention
samples on every feature level (all heads), coloured by level (one colour map per level) with
size and shade growing with the attention weight (Deformable DETR, Zhu et al., ICLR 2021,
Fig. 6 of https://arxiv.org/abs/2010.04159).

    python tools/analysis/visualize_deform_points.py CONFIG CKPT IMAGE --out-dir DIR \
        [--queries N | --query-ids 3 17 ...] [--score-thr 0.3] [--device cpu]

IMAGE is one image or a folder of images; one PNG per image is written to DIR. An image none of
whose top queries reaches ``--score-thr`` is skipped with a note naming its best score; when that
leaves nothing drawn at all (typical of an early checkpoint at the default 0.3) the tool exits
with status 1 and says to lower ``--score-thr`` or pass ``--query-ids``. Works with mmcv's
``MultiScaleDeformableAttention`` and our ``MSDeformAttn`` alike: a forward pre-hook on the
last decoder layer's ``cross_attn`` recomputes the sampling locations from its inputs with
``MSDeformAttn.sampling_points``, so the model itself is not changed.

Sampling locations are normalised to each level's padded feature map; they are drawn at
``location * batch_input_shape / scale_factor``, exact up to the backbone's stride rounding.
"""
import argparse
import os
import os.path as osp
import sys
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import mmcv  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from mmcv.ops import MultiScaleDeformableAttention  # noqa: E402
from mmdet.apis import inference_detector, init_detector  # noqa: E402
from mmdet.structures.bbox import bbox_cxcywh_to_xyxy  # noqa: E402
from mmengine.config import DictAction  # noqa: E402


from mmdet_detrx.models.layers import MSDeformAttn  # noqa: E402
from mmdet_detrx.utils.image_files import list_images, output_names  # noqa: E402
from mmdet_detrx.tools.common import (add_common_args, exit_status, panel_grid,  # noqa: E402
                                      panel_shape, removing)

LEVEL_CMAPS = ('Reds', 'Greens', 'Blues', 'Purples', 'Oranges', 'Greys')
PANEL_COLS = 4


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', help='model config (Deformable DETR / DINO family)')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('image', help='an image, or a folder of images')
    add_common_args(parser, 'out_dir')
    which = parser.add_mutually_exclusive_group()
    which.add_argument('--queries', type=int, default=4,
                       help='draw the N top-scoring queries (default 4)')
    which.add_argument('--query-ids', type=int, nargs='+', help='draw these decoder queries')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='skip top queries scoring below this (not applied to --query-ids)')
    parser.add_argument('--panel-size', type=int, default=400,
                        help='longer side of each panel in pixels (default 400)')
    add_common_args(parser, 'device')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, xxx=yyy format')
    args = parser.parse_args(argv)
    if args.out_dir is None:
        parser.error('--out-dir is required: where the PNGs go')
    if args.queries is not None and args.queries < 1:
        parser.error('--queries must be at least 1')
    if args.panel_size < 16:
        parser.error('--panel-size must be at least 16')
    return args


class SamplingRecorder:
    """Records a deformable attention's sampling points and the head's last-layer outputs."""

    def __init__(self, model):
        layers = getattr(getattr(model, 'decoder', None), 'layers', None)
        cross_attn = getattr(layers[-1], 'cross_attn', None) if layers else None
        if not isinstance(cross_attn, MultiScaleDeformableAttention):
            raise TypeError(f'{type(model).__name__} has no deformable decoder cross-attention '
                            '(expected a Deformable DETR / DINO family model)')
        self.records: Dict[str, torch.Tensor] = {}
        self._handles = [
            cross_attn.register_forward_pre_hook(self._record_sampling, with_kwargs=True),
            model.bbox_head.register_forward_hook(self._record_head),
        ]

    def _record_sampling(self, module, args, kwargs):
        query = kwargs['query'] if 'query' in kwargs else args[0]
        if kwargs.get('query_pos') is not None:
            query = query + kwargs['query_pos']
        if not module.batch_first:
            query = query.transpose(0, 1)  # (B, Q, C)
        # Unbound on purpose: mmcv's module has the same parameters, so this works for both.
        locations, weights = MSDeformAttn.sampling_points(
            module, query, kwargs['reference_points'], kwargs['spatial_shapes'])
        self.records['sampling_locations'] = locations.detach().float().cpu()
        self.records['attention_weights'] = weights.detach().float().cpu()
        self.records['reference_points'] = kwargs['reference_points'].detach().float().cpu()

    def _record_head(self, module, args, outputs):
        all_layers_cls_scores, all_layers_bbox_preds = outputs[:2]
        self.records['cls_scores'] = all_layers_cls_scores[-1].detach().float().cpu()
        self.records['bbox_preds'] = all_layers_bbox_preds[-1].detach().float().cpu()

    def remove(self):
        for handle in self._handles:
            handle.remove()


def select_queries(cls_scores: torch.Tensor, num_queries: Optional[int],
                   query_ids: Optional[Sequence[int]], score_thr: float) -> List[int]:
    """Query indices to draw, best first; ``cls_scores`` is the last layer's ``(Q, classes)``."""
    scores = cls_scores.sigmoid().amax(-1)  # (Q,)
    if query_ids:
        bad = [q for q in query_ids if not 0 <= q < len(scores)]
        if bad:
            raise ValueError(f'--query-ids {bad} out of range: the model has {len(scores)} '
                             'decoder queries')
        return list(query_ids)
    order = scores.argsort(descending=True)[:num_queries]
    return [int(q) for q in order if scores[q] >= score_thr]


def _level_legend(num_levels: int) -> list:
    handles = []
    for level in range(num_levels):
        color = plt.get_cmap(LEVEL_CMAPS[level % len(LEVEL_CMAPS)])(0.85)
        handles.append(Line2D([], [], marker='o', linestyle='', color=color, markersize=5,
                              label=f'level {level}'))
    return handles


def draw(image_rgb: np.ndarray, records: Dict[str, torch.Tensor], meta: dict,
         query_ids: Sequence[int], class_names: Sequence[str], out_file: str,
         panel_size: int = 400) -> None:
    """Write one PNG with a panel per query (see the module docstring)."""
    h, w = image_rgb.shape[:2]
    scale_w, scale_h = meta['scale_factor']
    pad_h, pad_w = meta['batch_input_shape']
    img_h, img_w = meta['img_shape']

    scores = records['cls_scores'][0].sigmoid()  # (Q, classes)
    boxes = bbox_cxcywh_to_xyxy(records['bbox_preds'][0])  # (Q, 4) normalised to img_shape
    boxes = boxes * boxes.new_tensor([img_w / scale_w, img_h / scale_h] * 2)
    # (Q, heads, levels, points, 2) normalised to the padded maps -> original image pixels
    to_pixels = torch.tensor([pad_w / scale_w, pad_h / scale_h])
    points = records['sampling_locations'][0] * to_pixels
    weights = records['attention_weights'][0]  # (Q, heads, levels, points)
    references = records['reference_points'][0, :, 0, :2] * to_pixels  # (Q, 2), level 0
    num_levels = points.shape[2]

    ph, pw = panel_shape((h, w), panel_size)
    rows, cols = panel_grid(len(query_ids), PANEL_COLS)
    fig_h, fig_w = rows * ph, cols * pw
    dpi = 100
    fig = plt.figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi)
    for i, query in enumerate(query_ids):
        row, col = divmod(i, cols)
        ax = fig.add_axes([col / cols, 1 - (row + 1) / rows, 1 / cols, 1 / rows])
        ax.imshow(image_rgb, extent=(0, w, h, 0))
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)  # points sampled outside the image are clipped
        ax.set_axis_off()

        query_weights = weights[query]
        top = float(query_weights.max())
        for level in range(num_levels):
            xy = points[query, :, level].reshape(-1, 2)
            wt = query_weights[:, level].reshape(-1) / top  # 1 = this query's heaviest point
            ax.scatter(xy[:, 0], xy[:, 1], s=4 + 60 * wt, c=wt, vmin=-0.3, vmax=1,
                       cmap=LEVEL_CMAPS[level % len(LEVEL_CMAPS)], edgecolors='white',
                       linewidths=0.3)
        x1, y1, x2, y2 = boxes[query].tolist()
        ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color='yellow',
                                   linewidth=1.5))
        ax.plot(*references[query].tolist(), marker='x', color='cyan', markersize=8, mew=2)
        label = int(scores[query].argmax())
        name = class_names[label] if label < len(class_names) else str(label)
        ax.text(2, 2, f'query {query}: {name} {float(scores[query, label]):.2f}',
                va='top', fontsize=8, color='black',
                bbox=dict(facecolor='yellow', alpha=0.8, pad=1, linewidth=0))
        if i == 0:
            ax.legend(handles=_level_legend(num_levels), loc='lower right', fontsize=6,
                      framealpha=0.7)
    os.makedirs(osp.dirname(osp.abspath(out_file)), exist_ok=True)
    fig.savefig(out_file, dpi=dpi)
    plt.close(fig)


def visualize_image(model, image_path: str, out_file: str, num_queries: Optional[int] = 4,
                    query_ids: Optional[Sequence[int]] = None, score_thr: float = 0.3,
                    panel_size: int = 400) -> List[int]:
    """Run ``model`` on one image and draw its queries; returns the query ids drawn."""
    with removing(SamplingRecorder(model)) as recorder:
        result = inference_detector(model, image_path)
    records = recorder.records
    missing = {'sampling_locations', 'cls_scores'} - set(records)
    if missing:
        raise RuntimeError(f'inference did not reach the hooked modules ({sorted(missing)})')
    chosen = select_queries(records['cls_scores'][0], num_queries, query_ids, score_thr)
    if not chosen:
        best = float(records['cls_scores'][0].sigmoid().max())
        print(f'{image_path}: no query scores >= --score-thr {score_thr} (best {best:.3f}); '
              'nothing drawn', file=sys.stderr)
        return []
    image_rgb = mmcv.imread(image_path, channel_order='rgb')
    class_names = (model.dataset_meta or {}).get('classes', ())
    draw(image_rgb, records, result.metainfo, chosen, class_names, out_file, panel_size)
    return chosen


def main(argv=None) -> List[str]:
    """Draw every image; returns the PNGs written. Exits with status 1 if it wrote none."""
    args = parse_args(argv)
    model = init_detector(args.config, args.checkpoint, device=args.device,
                          cfg_options=args.cfg_options)
    written = []
    images = list_images(args.image)
    # one output per input: a.png and a.jpg must not overwrite each other
    for image_path, name in zip(images, output_names(images, '_deform_points')):
        out_file = osp.join(args.out_dir, name)
        if visualize_image(model, image_path, out_file, args.queries, args.query_ids,
                           args.score_thr, args.panel_size):
            print(f'{image_path} -> {out_file}')
            written.append(out_file)
    if not written:
        raise SystemExit(f'nothing drawn: no query of any image scores >= --score-thr '
                         f'{args.score_thr}; lower --score-thr (e.g. 0 for the top --queries '
                         'whatever their score) or pass --query-ids')
    return written


if __name__ == '__main__':
    sys.exit(exit_status(main()))
