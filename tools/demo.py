"""`make demo`: train the demo config on the embedded dataset, then evaluate its last checkpoint.

Runs ``tools/train.py`` (resuming if an earlier demo run left checkpoints) and ``tools/test.py``
exactly as a user would, and prints the bbox mAP reached.
"""
import argparse
import glob
import json
import os.path as osp
import subprocess
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEFAULT_CONFIG = 'configs/demo/deformable-detrx_r18_1xb8-1000i_synthetic-shapes.py'


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--config', default=DEFAULT_CONFIG)
    parser.add_argument('--work-dir', default='work_dirs/demo')
    parser.add_argument('--cfg-options', nargs='+', default=[])
    args = parser.parse_args()

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


if __name__ == '__main__':
    main()
