"""Convert a DETR-family checkpoint of another code base into ours: a checkpoint and a config.

    python tools/model_converters/convert.py SRC OUT_DIR [--from LAYOUT] [--coco80]
    python -m mmdet_detrx.tools.model_converters.convert SRC OUT_DIR      (or: detrx-convert)
    python tools/model_converters/convert.py --to-hf CONFIG CHECKPOINT OUT_DIR

SRC is a checkpoint file (``.pth``/``.bin``/``.safetensors``) or an HF ``save_pretrained`` /
hub-snapshot folder (config.json + model.safetensors). The layout is detected unless ``--from``
names it (``--list`` prints them). Prints the written config and checkpoint and the commands to
run them; ``--to-hf`` writes our DETR / Deformable DETR as an HF folder instead
(docs/converters.md).
"""
import argparse
import sys
from typing import List, Optional

__all__ = ['main', 'parse_args']


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Convert a DETR-family checkpoint (HF transformers folder, original '
        'repositories, detrex) into an mmdet_detrx checkpoint + config',
        epilog='docs/converters.md lists the layouts and what each maps to.')
    parser.add_argument('src', nargs='?', help='checkpoint file or HF folder')
    parser.add_argument('out_dir', nargs='?', help='folder for the config and the checkpoint')
    parser.add_argument('--from', dest='layout', metavar='LAYOUT',
                        help='source layout (default: detected from the keys / config.json)')
    parser.add_argument('--config', help='a config of ours to base the written one on (its '
                        'num_classes must equal the checkpoint\'s)')
    parser.add_argument('--coco80', action='store_true',
                        help='keep the 80 real COCO classes of a 91-output (COCO category id) '
                        "classifier, for mmdet's CocoDataset/CocoMetric")
    parser.add_argument('--list', action='store_true', help='list the known layouts and exit')
    parser.add_argument('--to-hf', nargs=3, metavar=('CONFIG', 'CHECKPOINT', 'OUT_DIR'),
                        help='the reverse: our DETR / Deformable DETR to an HF folder')
    args = parser.parse_args(argv)
    if not args.list and not args.to_hf and (args.src is None or args.out_dir is None):
        parser.error('SRC and OUT_DIR are required (or --list, or --to-hf)')
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    from mmdet_detrx.converters import (ConversionError, convert_source, get_layout,
                                        list_layouts)
    if args.list:
        for name in list_layouts():
            print(f'{name:28s} {get_layout(name).description}')
        return 0
    try:
        if args.to_hf:
            from mmdet_detrx.converters.hf_export import to_hf
            folder = to_hf(*args.to_hf)
            print(f'HF folder: {folder}')
            print('load it with: AutoModelForObjectDetection.from_pretrained('
                  f'{folder!r})')
            return 0
        result = convert_source(args.src, args.out_dir, layout=args.layout, config=args.config,
                                coco80=args.coco80)
    except ConversionError as error:
        print(f'error: {error}', file=sys.stderr)
        return 1
    print(f'layout:     {result.layout} ({len(result.classes)} classes)')
    for note in result.notes:
        print(f'note:       {note}')
    print(f'config:     {result.config_path}')
    print(f'checkpoint: {result.checkpoint_path}')
    print('run them:')
    print(f'  python tools/test.py {result.config_path} {result.checkpoint_path}')
    print(f'  python tools/train.py {result.config_path}   # fine-tunes from the checkpoint '
          '(load_from)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
