"""Export a DETR-family detector (config + checkpoint) to ONNX: ``input -> (dets, labels)``.

    detrx-export CONFIG CHECKPOINT --out MODEL.onnx \\
        [--shape H W] [--batch N] [--dynamic] [--msda {grid_sample,trt-plugin}] [--opset N] \\
        [--verify [IMAGE]] [--cfg-options KEY=VALUE ...]

The graph is mmdet's inference path including ``bbox_head.predict``'s post-processing, in
mmdeploy's convention: ``input`` (N, 3, H, W) is the data preprocessor's output (normalised),
``dets`` (N, K, 5) = x1, y1, x2, y2 in pixels of ``input``, then the score; ``labels`` (N, K).
``--dynamic`` makes H and W dynamic (N stays fixed). ``--msda grid_sample`` (default) writes
multi-scale deformable attention as GridSample ops that ONNX Runtime runs (opset >= 16);
``--msda trt-plugin`` writes one TensorRT ``MultiscaleDeformableAttnPlugin_TRT`` node per
attention instead (for TensorRT; not runnable in ONNX Runtime). ``--verify`` runs the exported
file in ONNX Runtime (CPU) on IMAGE (resized to H x W) or a random input and compares it with
PyTorch (scores within 1e-4, boxes within 1e-3 px); with ``--dynamic`` also at a second size.
The checkpoint is loaded strictly. See docs/deployment.md.
"""
import argparse
import os
import os.path as osp
import sys

import torch
from mmengine.config import DictAction
from mmengine.registry import init_default_scope
from mmengine.runner import load_checkpoint

import mmdet_detrx  # noqa: F401  (registers our modules)
from mmdet.registry import MODELS
from mmdet_detrx.deploy import (DEFAULT_OPSET, MSDA_MODES, OnnxExportError, compare_detections,
                                export_detector_onnx, onnxruntime_session, pytorch_detections,
                                run_onnxruntime)
from mmdet_detrx.tools.common import add_shape_arg, load_config
from mmdet_detrx.utils import TRUSTED_CHECKPOINTS_ENV, UnsafeCheckpointError


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', help='model config')
    parser.add_argument('checkpoint', help='checkpoint file (loaded strictly)')
    parser.add_argument('--out', required=True, help='the ONNX file to write')
    add_shape_arg(parser, help='input height and width traced')
    parser.add_argument('--batch', type=int, default=1, help='batch size N (fixed; default 1)')
    parser.add_argument('--dynamic', action='store_true', help='dynamic input height and width')
    parser.add_argument('--msda', choices=MSDA_MODES, default='grid_sample',
                        help='how multi-scale deformable attention is written (default '
                        'grid_sample)')
    parser.add_argument('--opset', type=int, default=DEFAULT_OPSET,
                        help=f'ONNX opset (default {DEFAULT_OPSET})')
    parser.add_argument('--verify', nargs='?', const='', default=None, metavar='IMAGE',
                        help='compare ONNX Runtime with PyTorch on IMAGE (or a random input)')
    parser.add_argument('--trust-checkpoint', action='store_true',
                        help='load a legacy checkpoint that needs arbitrary pickled objects '
                        '(runs code from the file; only for files you trust)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings in the config, key=value')
    return parser.parse_args(argv)


def build_detector(config: str, checkpoint: str, cfg_options=None):
    """The config's model with the checkpoint loaded strictly, on CPU, in eval mode."""
    cfg = load_config(config, cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    model = MODELS.build(cfg.model)
    if not osp.isfile(checkpoint):
        raise FileNotFoundError(f'checkpoint not found: {checkpoint}')
    try:
        load_checkpoint(model, checkpoint, map_location='cpu', strict=True, logger='silent')
    except UnsafeCheckpointError as error:
        raise OnnxExportError(str(error)) from error
    except RuntimeError as error:
        raise OnnxExportError(f'checkpoint {checkpoint} does not match the model of {config} '
                              f'(loaded strictly): {error}') from error
    return model.eval()


def image_input(model, image: str, height: int, width: int, batch: int) -> torch.Tensor:
    """IMAGE resized to (height, width) and put through the model's data preprocessor."""
    import mmcv
    pixels = mmcv.imresize(mmcv.imread(image), (width, height))  # (H, W, 3) BGR
    tensor = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
    data = model.data_preprocessor({'inputs': [tensor] * batch, 'data_samples': None}, False)
    return data['inputs'][:, :, :height, :width].float()


def verify(model, onnx_file: str, args) -> bool:
    height, width = args.shape
    sizes = [(height, width)]
    if args.dynamic:  # a second size, not a multiple of the first
        sizes.append((max(32, height * 3 // 4 + 8), max(32, width * 5 // 4 - 8)))
    session = onnxruntime_session(onnx_file)
    ok = True
    for h, w in sizes:  # pytorch_detections runs ACT layers exact, as exported
        if args.verify:
            inputs = image_input(model, args.verify, h, w, args.batch)
        else:
            inputs = torch.randn(args.batch, 3, h, w, generator=torch.Generator().manual_seed(1))
        result = compare_detections(pytorch_detections(model, inputs),
                                    run_onnxruntime(session, inputs))
        print(f'verify {h}x{w}: ONNX Runtime vs PyTorch: {result}')
        ok = ok and result.matched
    return ok


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.batch < 1:
        raise SystemExit(f'--batch must be >= 1, got {args.batch}')
    if args.verify is not None and args.msda == 'trt-plugin':
        raise SystemExit('--verify needs --msda grid_sample: ONNX Runtime cannot run the '
                         'TensorRT plugin nodes')
    if args.verify and not osp.isfile(args.verify):
        raise SystemExit(f'--verify image not found: {args.verify}')
    if args.trust_checkpoint:
        os.environ[TRUSTED_CHECKPOINTS_ENV] = '1'
    try:
        model = build_detector(args.config, args.checkpoint, args.cfg_options)
        summary = export_detector_onnx(model, args.out, (args.batch, 3, *args.shape),
                                       dynamic=args.dynamic, msda=args.msda, opset=args.opset)
    except OnnxExportError as error:
        print(f'error: {error}', file=sys.stderr)
        return 1
    print(f'wrote {summary.out_file}: opset {summary.opset}, {summary.num_nodes} nodes, '
          f'input {summary.input_shape}{" (H, W dynamic)" if summary.dynamic else ""}; '
          f'{summary.num_msda_modules} deformable attention(s) as '
          + (f'{summary.num_plugin_nodes} MultiscaleDeformableAttnPlugin_TRT nodes'
             if summary.msda == 'trt-plugin' else
             f'{summary.num_grid_sample_nodes} GridSample nodes')
          + (f'; {summary.act_exact_layers} ACT layer(s) exported as exact attention'
             if summary.act_exact_layers else ''))
    if args.verify is not None and not verify(model, summary.out_file, args):
        print('error: ONNX Runtime and PyTorch disagree', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
