"""Draw a config's dataset samples (after its pipeline) with their ground truth, as mmdet's
``browse_dataset``: ``python tools/analysis/browse_dataset.py CONFIG --out-dir DIR``
(``--output-dir``, mmdet's spelling, is an alias).

Works for the embedded synthetic-shapes dataset (generated on first use) and any mmdet dataset.
"""
import argparse
import os.path as osp
import sys

import mmcv
from mmdet.registry import DATASETS, VISUALIZERS
from mmdet.structures.bbox import BaseBoxes
from mmengine.config import Config, DictAction
from mmengine.registry import init_default_scope

import mmdet_detrx  # noqa: F401
from mmdet_detrx.tools.common import add_common_args, exit_status, load_config
from mmdet_detrx.utils.image_files import output_names


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Browse a dataset')
    parser.add_argument('config', help='config file path')
    add_common_args(parser, 'out_dir')
    parser.add_argument('--output-dir', dest='out_dir', help=argparse.SUPPRESS)  # mmdet's name
    parser.add_argument('--num', type=int, default=16, help='how many samples to draw')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings in the config, key=value')
    args = parser.parse_args(argv)
    if args.out_dir is None:
        parser.error('--out-dir is required: where the PNGs are written')
    if args.num < 1:
        parser.error(f'--num must be at least 1, got {args.num}')
    return args


def browse(config: Config, output_dir: str, num: int = 16) -> list:
    """Write ``num`` annotated PNGs of the training set (after its pipeline); return paths.

    Like mmdet's tool, only the training pipeline is shown: test pipelines load ground truth
    after resizing, in original-image coordinates, so their boxes would not match the image.
    """
    init_default_scope(config.get('default_scope', 'mmdet'))
    dataset = DATASETS.build(config.train_dataloader.dataset)
    visualizer = VISUALIZERS.build(dict(type='DetLocalVisualizer', name='browse_dataset'))
    visualizer.dataset_meta = dataset.metainfo
    indices = range(min(num, len(dataset)))
    # one output per sample: a.png and a.jpg (or one file name in two folders) must not
    # overwrite each other
    names = output_names([dataset.get_data_info(i)['img_path'] for i in indices])
    written = []
    for index, name in zip(indices, names):
        item = dataset[index]
        image = mmcv.bgr2rgb(item['inputs'].permute(1, 2, 0).numpy())
        sample = item['data_samples']
        boxes = sample.gt_instances.get('bboxes')
        if isinstance(boxes, BaseBoxes):  # the visualizer draws plain (N, 4) arrays
            sample.gt_instances.bboxes = boxes.tensor
        sample = sample.numpy()
        out_file = osp.join(output_dir, name)
        visualizer.add_datasample(osp.basename(out_file), image, sample, draw_pred=False,
                                  show=False, out_file=out_file)
        written.append(out_file)
    return written


def main(argv=None) -> list:
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options)
    written = browse(cfg, args.out_dir, args.num)
    for path in written:
        print(path)
    return written


if __name__ == '__main__':
    sys.exit(exit_status(main()))
