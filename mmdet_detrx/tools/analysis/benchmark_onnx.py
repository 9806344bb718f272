"""ONNX Runtime (CPU) latency of an exported detector vs our PyTorch model in fp32 and bf16.

    python tools/analysis/benchmark_onnx.py [CONFIG] [--checkpoint CKPT] [--shape H W] \\
        [--threads N] [--repeats 3] [--warmup 1] [--onnx MODEL.onnx] [--out-dir DIR]

CONFIG defaults to our Deformable DETR R50
(``configs/deformable_detr/deformable-detrx_r50_16xb2-50e_coco.py``); without ``--checkpoint``
the model is randomly initialised (``backbone.init_cfg=None``). The model is exported with
``mmdet_detrx.deploy.export_detector_onnx`` (``--msda grid_sample``, static ``--shape``, default
800 1333) unless ``--onnx`` gives an export of the same config, then one preprocessed input of
that shape runs through three paths computing the same ``(dets, labels)`` (inference including
the head's post-processing, batch 1), timed interleaved run by run:

* ``onnxruntime``: ``InferenceSession`` on the CPU execution provider, ``--threads`` intra-op
  threads, graph optimisations at ORT's default (all);
* ``pytorch fp32``: ``DetectionExportWrapper(model)(input)`` under ``torch.no_grad``, our native
  MSDA op, ``torch.set_num_threads(--threads)``;
* ``pytorch bf16``: the same under ``torch.autocast('cpu', torch.bfloat16)``.

Also printed: ONNX Runtime vs PyTorch fp32 agreement on that input (``compare_detections``).
"""
import argparse
import os
import os.path as osp
import sys
import tempfile

import torch

from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.runner import load_checkpoint  # noqa: E402

import mmdet_detrx  # noqa: F401,E402  (registers our modules)
from mmdet.registry import MODELS  # noqa: E402
from mmdet_detrx.config_path import CONFIG_ROOT  # noqa: E402
from mmdet_detrx.deploy import (DetectionExportWrapper, compare_detections,  # noqa: E402
                                export_detector_onnx, onnxruntime_session, run_onnxruntime)
from mmdet_detrx.tools.common import (Column, add_common_args, add_shape_arg,  # noqa: E402
                                      load_config, machine_line, markdown_table, time_calls)

DEFAULT_CONFIG = osp.join(CONFIG_ROOT, 'deformable_detr/deformable-detrx_r50_16xb2-50e_coco.py')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', nargs='?', default=DEFAULT_CONFIG, help='model config')
    parser.add_argument('--checkpoint', help='weights (default: random initialisation)')
    add_shape_arg(parser, help='input height and width exported and timed')
    parser.add_argument('--onnx', help='an existing export of CONFIG at --shape (skip export)')
    parser.add_argument('--opset', type=int, default=17)
    add_common_args(parser, 'threads', 'repeats', 'warmup', 'out_dir')
    return parser.parse_args(argv)


def build_model(config: str, checkpoint=None):
    cfg = load_config(config, weights_from_checkpoint=True)  # random init: no download either
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    if checkpoint:
        load_checkpoint(model, checkpoint, map_location='cpu', strict=True, logger='silent')
    else:
        model.init_weights()
    return model.eval()


def main(argv=None):
    args = parse_args(argv)
    threads = (args.threads or [torch.get_num_threads()])[0]
    torch.set_num_threads(threads)
    height, width = args.shape
    model = build_model(args.config, args.checkpoint)
    inputs = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))

    with tempfile.TemporaryDirectory() as tmp:
        onnx_file = args.onnx
        if onnx_file is None:
            onnx_file = osp.join(tmp, 'model.onnx')
            export_detector_onnx(model, onnx_file, (1, 3, height, width), opset=args.opset)
        session = onnxruntime_session(onnx_file, threads=threads)
        wrapper = DetectionExportWrapper(model)

        def pytorch(dtype):
            def run():
                with torch.no_grad(), torch.autocast('cpu', torch.bfloat16,
                                                     enabled=dtype == 'bfloat16'):
                    return wrapper(inputs)
            return run

        timings = time_calls({'onnxruntime': lambda: run_onnxruntime(session, inputs),
                              'pytorch fp32': pytorch('float32'),
                              'pytorch bf16': pytorch('bfloat16')},
                             repeats=args.repeats, warmup=args.warmup)
    fp32 = timings['pytorch fp32'].output
    parity = compare_detections((fp32[0].float().numpy(), fp32[1].numpy()),
                                timings['onnxruntime'].output)
    base = timings['pytorch fp32'].median
    rows = [dict(path=name, median=t.median_ms, min=1e3 * t.min, ratio=base / t.median)
            for name, t in timings.items()]
    table = markdown_table(rows, [Column('path', align='left'),
                                  Column('median', 'median (ms)', '{:.0f}'),
                                  Column('min', 'min (ms)', '{:.0f}'),
                                  Column('ratio', 'speed vs PyTorch fp32', '{:.2f}x')])
    import onnxruntime
    header = (f'{osp.relpath(args.config, CONFIG_ROOT)}, input 1x3x{height}x{width}, '
              f'{args.repeats} runs after {args.warmup} warm-up, {threads} thread(s), '
              f'onnxruntime {onnxruntime.__version__}\n'
              f'{machine_line()}\n'
              f'onnxruntime vs pytorch fp32 on this input: {parity}\n')
    text = header + '\n' + table
    print(text)
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(osp.join(args.out_dir, 'benchmark_onnx.md'), 'w') as f:
            f.write(text + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
