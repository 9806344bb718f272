"""Show what ACT groups together: each encoder feature-map cell coloured by its cluster.

    python tools/analysis/visualize_act_clusters.py CONFIG CKPT IMAGE --out-dir DIR
        [--head K] [--panel-size 300] [--device cpu] [--cfg-options ...]

CONFIG is a DETR config whose encoder self-attention is ``AdaptiveClusteringAttention``
(e.g. ``configs/act/act-detr_r18-dc5_1xb8-3000i_synthetic-shapes.py``), CKPT its (or a plain
DETR's) checkpoint, IMAGE one image or a folder of images. For each image, one PNG
``DIR/<image name>_act_clusters.png``: the image, then one panel per encoder layer in which every
feature-map cell (one encoder token) is coloured by the cluster that layer's head ``--head``
put it in (Zheng, Gao et al., BMVC 2021, Fig. 3), with the layer's cluster count in the title.
Cells sharing a colour share a prototype, hence an attention output. Colours are assigned per
panel by a fixed shuffle of the cluster ids, so they are comparable only within a panel.
"""
import argparse
import math
import os
import os.path as osp
import sys
from typing import Optional, Sequence, Tuple

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import mmcv  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmdet.apis import inference_detector, init_detector  # noqa: E402
from mmengine.config import DictAction  # noqa: E402

from mmdet_detrx.models.layers import record_act_forwards, resolve_act_layers  # noqa: E402
from mmdet_detrx.tools.common import (act_layers, exit_status, load_config,  # noqa: E402
                                      panel_grid, panel_shape, removing, require_act_layers)
from mmdet_detrx.utils.image_files import list_images, output_names  # noqa: E402

PANEL_COLS = 4
TITLE_PX = 24  # pixel band above each panel for its title


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', help='DETR config with ACT encoder attention')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('image', help='an image, or a folder of images')
    parser.add_argument('--out-dir', required=True, help='where the PNGs go')
    parser.add_argument('--head', type=int, default=0, help='attention head to show (default 0)')
    parser.add_argument('--panel-size', type=int, default=300,
                        help='longer side of each panel in pixels (default 300)')
    parser.add_argument('--device', default='cpu', help='e.g. cpu or cuda:0')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, xxx=yyy format')
    args = parser.parse_args(argv)
    if args.panel_size < 16:
        parser.error('--panel-size must be at least 16')
    return args


def figure_shape(image_hw: Tuple[int, int], num_layers: int, panel_size: int):
    """Pixel (height, width) of the PNG for ``num_layers`` encoder layers (+ the image)."""
    ph, pw = panel_shape(image_hw, panel_size)
    rows, cols = panel_grid(num_layers + 1, PANEL_COLS)
    return rows * (ph + TITLE_PX), cols * pw


def cluster_colours(cluster_map: np.ndarray, seed: int = 0) -> np.ndarray:
    """(h, w) ids -> (h, w, 3) colours, neighbouring ids far apart in hue."""
    num = int(cluster_map.max()) + 1
    palette = plt.get_cmap('hsv')(np.linspace(0, 1, max(num, 1), endpoint=False))[:, :3]
    order = np.random.default_rng(seed).permutation(max(num, 1))
    shade = 0.55 + 0.45 * np.random.default_rng(seed + 1).random(max(num, 1))[:, None]
    return (palette[order] * shade)[cluster_map]


def draw(image_rgb: np.ndarray, cluster_maps: Sequence[np.ndarray], counts: Sequence[int],
         head: int, out_file: str, panel_size: int = 300) -> None:
    """One PNG: the image, then each layer's cluster map over it (see module docstring)."""
    h, w = image_rgb.shape[:2]
    ph, pw = panel_shape((h, w), panel_size)
    fig_h, fig_w = figure_shape((h, w), len(cluster_maps), panel_size)
    dpi = 100
    fig = plt.figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi)
    _, cols = panel_grid(len(cluster_maps) + 1, PANEL_COLS)
    panels = [('image', None)] + list(zip(counts, cluster_maps))
    for index, (count, cluster_map) in enumerate(panels):
        row, col = divmod(index, cols)
        left = col * pw / fig_w
        bottom = 1 - (row * (ph + TITLE_PX) + TITLE_PX + ph) / fig_h
        ax = fig.add_axes((left, bottom, pw / fig_w, ph / fig_h))
        ax.imshow(image_rgb, extent=(0, w, h, 0), interpolation='bilinear')
        if cluster_map is None:
            ax.set_title('image', fontsize=9, pad=3)
        else:
            # image_rgb spans exactly the cells: each is a stride x stride input patch.
            ax.imshow(cluster_colours(cluster_map), extent=(0, w, h, 0),
                      interpolation='nearest', alpha=0.6)
            ax.set_title(f'layer {index - 1}: {count} clusters (head {head})', fontsize=9, pad=3)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.axis('off')
    fig.savefig(out_file, dpi=dpi)
    plt.close(fig)


class FeatureShapeRecorder:
    """Records the (h, w) of the feature map the encoder flattens (last neck/backbone output)."""

    def __init__(self, model: torch.nn.Module) -> None:
        source = getattr(model, 'neck', None) or model.backbone
        self.shape = None
        self._handle = source.register_forward_hook(self._record)

    def _record(self, module, args, output):
        self.shape = tuple(output[-1].shape[-2:])

    def remove(self) -> None:
        self._handle.remove()


def visualize(model, image_file: str, out_dir: str, head: int = 0,
              panel_size: int = 300, out_name: Optional[str] = None) -> str:
    """Draw one image's clusters into ``out_dir/out_name`` (default
    ``<image name>_act_clusters.png``); returns the file written."""
    layers = require_act_layers(model, 'the model')
    if not 0 <= head < layers[0].num_heads:
        raise ValueError(f'--head {head} out of range: the encoder has {layers[0].num_heads} '
                         'heads')
    for layer in layers:
        layer.use_exact = False
    with removing(FeatureShapeRecorder(model)) as recorder, \
            record_act_forwards(model) as forwards:
        result = inference_detector(model, image_file)
    records = [forwards[name][-1] for name in act_layers(model)]
    meta = result.metainfo
    img_h, img_w = meta['img_shape'][:2]
    pad_h, pad_w = meta.get('batch_input_shape', meta['img_shape'])[:2]
    feat_h, feat_w = recorder.shape
    # Cells covering the image, not the padding the batch added to its right/bottom.
    rows = min(feat_h, math.ceil(feat_h * img_h / pad_h))
    cols = min(feat_w, math.ceil(feat_w * img_w / pad_w))
    cluster_maps, counts = [], []
    for record in records:
        ids = record.cluster_ids[0, head].reshape(feat_h, feat_w)[:rows, :cols]
        cluster_maps.append(ids.clamp(min=0).cpu().numpy())
        counts.append(int(record.num_clusters[0, head]))
    image = mmcv.imread(image_file, channel_order='rgb')
    # The network saw the image resized to img_shape; the cells cover rows * stride of it.
    image = mmcv.imresize(image, (img_w, img_h))
    pad = np.zeros((math.ceil(rows * pad_h / feat_h), math.ceil(cols * pad_w / feat_w), 3),
                   dtype=image.dtype)
    keep_h, keep_w = min(img_h, pad.shape[0]), min(img_w, pad.shape[1])
    pad[:keep_h, :keep_w] = image[:keep_h, :keep_w]
    os.makedirs(out_dir, exist_ok=True)
    out_file = osp.join(out_dir, out_name or output_names([image_file], '_act_clusters')[0])
    draw(pad, cluster_maps, counts, head, out_file, panel_size)
    return out_file


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options, weights_from_checkpoint=True)
    model = init_detector(cfg, args.checkpoint, device=args.device)
    resolve_act_layers(model)  # per-layer settings (lists) take their layer's entry
    images = list_images(args.image)
    # one output per input: a.png and a.jpg must not overwrite each other
    written = [visualize(model, f, args.out_dir, args.head, args.panel_size, name)
               for f, name in zip(images, output_names(images, '_act_clusters'))]
    for path in written:
        print(path)
    return written


if __name__ == '__main__':
    sys.exit(exit_status(main()))
