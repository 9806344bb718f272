"""`make demo`: train the demo config on the embedded dataset, evaluate it, draw its detections.

Runs ``tools/train.py`` (resuming if an earlier demo run left checkpoints) and ``tools/test.py``
exactly as a user would, prints the bbox mAP reached, then draws the trained model's detections
next to the ground truth on the first few val images and prints where it wrote them.
"""
import argparse
import glob
import json
import os
import os.path as osp
import subprocess
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEFAULT_CONFIG = 'configs/demo/dinox-aux_r18-w32_1xb8-1000i_synthetic-shapes.py'


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--config', default=DEFAULT_CONFIG)
    parser.add_argument('--work-dir', default='work_dirs/demo')
    parser.add_argument('--cfg-options', nargs='+', default=[])
    parser.add_argument('--num-images', type=int, default=4,
                        help='val images to draw the detections on (0: none)')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='draw detections scoring at least this')
    return parser.parse_args(argv)


def draw_detections(config, checkpoint, cfg_options, out_dir, num_images, score_thr, scale=3):
    """Draw ground truth | detections (score >= ``score_thr``) of ``checkpoint`` on the first
    ``num_images`` images of the config's test set, ``scale`` times enlarged; return
    ``(path, summary)`` per image (object and detection counts, best score)."""
    import cv2
    import torch
    from mmdet.apis import inference_detector, init_detector
    from mmdet.registry import DATASETS
    from mmdet.structures import DetDataSample
    from mmdet.visualization import DetLocalVisualizer
    from mmengine.config import DictAction
    from mmengine.structures import InstanceData

    import mmdet_detrx  # noqa: F401  (registers our modules, safe checkpoint loading)
    from mmdet_detrx.tools.common import load_config

    options = argparse.ArgumentParser()
    options.add_argument('--cfg-options', nargs='+', action=DictAction, default={})
    cfg = load_config(config, options.parse_args(['--cfg-options', *cfg_options]).cfg_options
                      if cfg_options else None, weights_from_checkpoint=True)
    model = init_detector(cfg, checkpoint, device='cpu')
    dataset = DATASETS.build(cfg.test_dataloader.dataset)
    visualizer = DetLocalVisualizer(name=f'detrx_demo_{os.getpid()}')
    visualizer.dataset_meta = model.dataset_meta
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for index in range(min(num_images, len(dataset))):
        info = dataset.get_data_info(index)
        image = cv2.imread(info['img_path'])
        pred = inference_detector(model, image).pred_instances
        gt = [inst for inst in info['instances'] if not inst.get('ignore_flag', 0)]
        sample = DetDataSample()
        sample.gt_instances = InstanceData(
            bboxes=torch.tensor([inst['bbox'] for inst in gt],
                                dtype=torch.float32).reshape(-1, 4) * scale,
            labels=torch.tensor([inst['bbox_label'] for inst in gt], dtype=torch.long))
        sample.pred_instances = InstanceData(bboxes=pred.bboxes * scale, labels=pred.labels,
                                             scores=pred.scores)
        big = cv2.resize(image[..., ::-1], None, fx=scale, fy=scale,
                         interpolation=cv2.INTER_NEAREST)  # RGB, as the visualizer draws
        out_file = osp.join(out_dir, osp.basename(info['img_path']))
        visualizer.add_datasample(osp.basename(out_file), big, sample, draw_gt=True,
                                  draw_pred=True, pred_score_thr=score_thr, out_file=out_file)
        kept = pred.scores >= score_thr
        best = f', best {pred.scores.max():.2f}' if len(pred.scores) else ''
        paths.append((out_file, f'{len(gt)} objects, {int(kept.sum())} detections >= '
                      f'{score_thr}{best}'))
    return paths


def main(argv=None):
    args = parse_args(argv)
    extra = ['--cfg-options', *args.cfg_options] if args.cfg_options else []
    train = [sys.executable, 'tools/train.py', args.config, '--work-dir', args.work_dir]
    if osp.exists(osp.join(args.work_dir, 'last_checkpoint')):
        train.append('--resume')
    subprocess.run(train + extra, cwd=ROOT, check=True)

    with open(osp.join(ROOT, args.work_dir, 'last_checkpoint')) as f:
        checkpoint = f.read().strip()
    test_dir = osp.join(args.work_dir, 'test')
    subprocess.run([sys.executable, 'tools/test.py', args.config, checkpoint, '--work-dir',
                    test_dir] + extra, cwd=ROOT, check=True)

    # mmengine writes the metrics of the test run as {timestamp}/{timestamp}.json.
    results = sorted(glob.glob(osp.join(ROOT, test_dir, '*', '*.json')))
    with open(results[-1]) as f:
        metrics = json.load(f)
    print(f"\nDemo finished: checkpoint {checkpoint}\n"
          f"val bbox mAP = {metrics['coco/bbox_mAP']:.3f} "
          f"(mAP@50 = {metrics['coco/bbox_mAP_50']:.3f})")
    if args.num_images > 0:
        out_dir = osp.join(ROOT, args.work_dir, 'detections')
        cwd = os.getcwd()
        os.chdir(ROOT)  # relative paths (checkpoint, data_root) as train/test saw them
        try:
            paths = draw_detections(args.config, checkpoint, args.cfg_options, out_dir,
                                    args.num_images, args.score_thr)
        finally:
            os.chdir(cwd)
        print(f'Detections (score >= {args.score_thr}, right) next to the ground truth (left) '
              f'on {len(paths)} val images:')
        for path, summary in paths:
            print(f'  {path}  ({summary})')


if __name__ == '__main__':
    main()
