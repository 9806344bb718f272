"""Whole detectors on CPU: mmdet's stock model vs ours, same weights, same process, same input.

Pairs (``--models``; stock = mmdet 3.3's package config, ours = this repository's config, both
randomly initialised with ``backbone.init_cfg=None``; the stock model's state dict is loaded
into ours, strictly):

  deformable-detr         mmdet DeformableDETR (mmcv MSDA: grid_sample on CPU) vs DeformableDETRX
                          with MSDeformAttn
  deformable-detr-2stage  the same, two-stage with box refinement
  dino                    mmdet DINO-4scale R50 vs DINOX with MSDeformAttn
  detr-dc5-act            mmdet DETR-R50 with a DC5 backbone (exact attention) vs ACT encoder
  botnet-mask-rcnn        mmdet Mask R-CNN R50-FPN vs the same with a BoT50 backbone
                          (not strict: BoT50's attention tensors keep their own random init,
                          R50's replaced c5 conv2 weights are dropped; the key difference is
                          asserted to be exactly ``BoTNet.resnet_key_diff()``)
  hf-detr                 HF transformers DetrForObjectDetection (facebook/detr-resnet-50's
                          config: timm ResNet-50, 91 labels) vs DETRX converted from its
                          ``save_pretrained`` folder by ``mmdet_detrx.converters.convert``
  hf-deformable-detr      HF DeformableDetrForObjectDetection (SenseTime/deformable-detr's
                          config; transformers' CPU path: its PyTorch grid_sample deformable
                          attention) vs DeformableDETRX (MSDeformAttn) converted the same way

The HF pairs time inference only (``infer``; ``train`` is skipped for them): the HF side runs the
same preprocessing as mmdet's data preprocessor (BGR -> RGB, the converted config's mean/std,
zero padding, HF's ``pixel_mask``), HF's forward and its image processor's
``post_process_object_detection`` (top 100). They need transformers and timm (``[analysis]``
extra); without them they are left out of the default ``--models``.

Ours is our detector as a user gets it: the ``...X`` detectors also run the CNN backbone and
neck channels-last on CPU (``conv_memory_format='auto'``, see
``mmdet_detrx.models.detectors.channels_last``), which mmdet's stock detectors do not.
``--with-nchw`` adds a third model, ours with ``conv_memory_format='contiguous'`` (mmdet's NCHW
convolutions), timed in the same interleaved runs: the split of our gain into layout and attention.

Modes (``--modes``): ``infer`` = ``model.test_step`` (preprocess + predict incl. post-processing)
under ``torch.no_grad``, batch ``--batch-infer`` (1); ``train`` = ``model.train_step`` (preprocess,
forward, losses incl. matching, backward, optimizer step with the config's optimizer and
clipping), batch ``--batch-train`` (2). Dtypes (``--dtypes``): ``float32``, or ``bfloat16`` =
``torch.autocast('cpu', bfloat16)`` around inference and, for training, mmdet-detrx's
``CPUAmpOptimWrapper`` (the ``tools/train.py --amp`` path on CPU).

Input: a synthetic image per batch entry (a smooth gradient with a few flat-coloured boxes, which
are the ground-truth boxes/masks for training), ``--shape H W`` (default 800 1333). Content
matters only for ACT, whose cost follows the number of clusters; random-init weights and
synthetic images cluster differently from a trained DETR on COCO.

Measured per case:

* time: median (and min) of ``--repeats`` runs after ``--warmup`` untimed runs (at least one:
  it also counts FLOPs); stock and ours run interleaved, run by run;
* FLOPs: ``torch.utils.flop_counter`` over one run (matmuls/convolutions/attention), with the
  formulas of ``mmdet_detrx.utils.complexity`` for the ops it lacks (our deformable attention
  op's forward, CPU scaled dot-product attention; the deformable op's backward is not
  counted), reported as achieved GFLOP/s and as a percentage of this machine's measured GEMM
  peak in that dtype;
* peak memory: the growth of the process's resident set during one more run after the timed
  ones over the resident set just before it (Linux: ``malloc_trim`` frees retained heap, then
  the kernel's high-water mark ``VmHWM`` is reset through ``/proc/self/clear_refs`` and read
  afterwards): activations, workspaces, autocast weight copies and (train) gradients; weights
  and optimizer state present before the run are excluded. Not measured in the timed runs:
  the trim would make them fault the heap in again;
* stages: one extra run under ``torch.profiler`` with ``record_function`` ranges opened by
  wrappers around the model's submodules (backbone, neck, encoder, decoder, head incl. its
  post-processing/losses, attention modules; the train step also ``backward`` and
  ``optimizer``); shares are of the profiled step, ``other`` is what no range covers
  (preprocess, positional encodings, proposal selection, denoising queries, ...);
* encoder check (fp32 inference, DETR pairs): relative L2 difference of ours' encoder output to
  stock's on the first run (0 up to rounding for MSDA; ACT's approximation error for ACT).

Both models of a pair run in one process with glibc's malloc tuned as our train/test tools
tune it (:func:`mmdet_detrx.utils.tune_malloc`: large freed blocks are reused, not unmapped and
faulted in again; the header says whether it applied). ``MMDET_DETRX_MALLOC=default`` in the
environment times both with glibc's defaults instead.

Memory safety: before a pair's cases run at the requested shape, each model runs once per mode at
three smaller shapes (the largest 1/4 of the pixels and at most 400x667, the smallest 1/16 of
that or the model's minimum input) and the peak growth is extrapolated with a constant + linear
+ quadratic fit in the pixel count; a case whose estimate (x2, see ``MEMORY_MARGIN``) does not
fit in ``MemAvailable`` is refused with a message (and the tool exits 3) rather than run. A case
that raises (e.g. an mmcv op without a bf16 CPU kernel) is reported as ``failed: ...`` in its rows
and the tool goes on with the other cases (exit status 3).

Outputs: a markdown table to stdout, and with ``--out-dir``: ``benchmark_detectors.md``,
``.csv`` and ``.png`` (time and memory bars on a linear axis, each bar labelled with its ratio to
the stock fp32 model of its group). Example (the full matrix, for an idle machine)::

    python tools/analysis/benchmark_detectors.py --threads 2 --repeats 3 \\
        --out-dir work_dirs/benchmark_detectors
    python tools/analysis/benchmark_detectors.py --models deformable-detr dino --modes infer \\
        --dtypes float32 bfloat16 --shape 800 1333 --repeats 3 --out-dir work_dirs/bd
    python tools/analysis/benchmark_detectors.py --models hf-detr hf-deformable-detr \\
        --modes infer --threads 2 --repeats 3 --out-dir work_dirs/bd_hf   # vs HF transformers
"""
import argparse
import contextlib
import copy
import functools
import gc
import math
import os
import os.path as osp
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from mmdet_detrx.config_path import get_config_path
from mmdet_detrx.utils.malloc_tuning import tune_malloc
from mmdet_detrx.tools.common import (Column, PeakMemory, add_common_args, add_shape_arg,
                                      bar_chart, machine_line, markdown_table,
                                      memory_available_bytes, panel_grid, time_call,
                                      time_calls, write_csv)

DC5 = dict(strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2), out_indices=(3, ))


@dataclass
class Pair:
    """Two detectors compared with the same weights: the ``stock`` one (mmdet's) is the
    reference of every ratio and of the encoder check; ``ours`` is the same model built from
    our config (and, with ``--with-nchw``, an ``ours NCHW`` variant)."""
    stock: str  # config under mmdet's package configs
    ours: str  # config shipped with this package (configs/ in the clone)
    stock_label: str
    ours_label: str
    stock_backbone: Optional[dict] = None  # applied to the stock config's backbone
    strict: bool = True
    compare_encoder: bool = True
    min_pixels: int = 32 * 32  # smallest input the detector runs on
    hf: Optional[str] = None  # stock is HF transformers' model of this type, ours converted


PAIRS = {
    'deformable-detr': Pair(
        'deformable_detr/deformable-detr_r50_16xb2-50e_coco.py',
        'deformable_detr/deformable-detrx_r50_16xb2-50e_coco.py',
        'mmdet', 'ours (MSDeformAttn)'),
    'deformable-detr-2stage': Pair(
        'deformable_detr/deformable-detr-refine-twostage_r50_16xb2-50e_coco.py',
        'deformable_detr/deformable-detrx-refine-twostage_r50_16xb2-50e_coco.py',
        'mmdet', 'ours (MSDeformAttn)',
        min_pixels=48 * 340),  # top-300 proposals need >= 300 encoder tokens
    'dino': Pair(
        'dino/dino-4scale_r50_8xb2-12e_coco.py',
        'dino/dinox-4scale_r50_8xb2-12e_coco.py',
        'mmdet', 'ours (MSDeformAttn)',
        # top-900 proposals need >= 900 encoder tokens (about pixels / 48 over strides 8-64)
        min_pixels=48 * 1000),
    'detr-dc5-act': Pair(
        'detr/detr_r50_8xb2-150e_coco.py', 'act_detr_r50-dc5.py',
        'exact (mmdet DETR-DC5)', 'ours (ACT)', stock_backbone=DC5),
    'botnet-mask-rcnn': Pair(
        'mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', 'botnet/mask-rcnn_bot50_fpn_1x_coco.py',
        'mmdet R50', 'ours (BoT50)', strict=False, compare_encoder=False),
    'hf-detr': Pair(
        'transformers DetrForObjectDetection', 'hf-detr (converted)',
        'HF transformers', 'ours (converted)', hf='detr'),
    'hf-deformable-detr': Pair(
        'transformers DeformableDetrForObjectDetection', 'hf-deformable-detr (converted)',
        'HF transformers', 'ours (converted, MSDeformAttn)', hf='deformable_detr'),
}
ROLES = ('stock', 'ours', 'ours NCHW')  # a variant's place in its pair (the chart's series)
MODES = ('infer', 'train')
STAGES = ('backbone', 'neck', 'encoder', 'decoder', 'head')
STAGE_MODULES = {  # stage -> (detector attributes, methods wrapped)
    'backbone': (('backbone', ), ('forward', )),
    'neck': (('neck', ), ('forward', )),
    'encoder': (('encoder', ), ('forward', )),
    'decoder': (('decoder', ), ('forward', )),
    'head': (('bbox_head', 'rpn_head', 'roi_head'),
             ('forward', 'predict', 'loss', 'loss_and_predict')),
}
ATTENTION_CLASSES = ('MultiScaleDeformableAttention', 'MSDeformAttn', 'MultiheadAttention',
                     'AdaptiveClusteringAttention', 'BottleneckAttention',
                     # HF transformers 5 (the HF pairs)
                     'DetrSelfAttention', 'DetrCrossAttention', 'DeformableDetrSelfAttention',
                     'DeformableDetrMultiscaleDeformableAttention')
MEMORY_MARGIN = 2.0  # the estimate was 0.5-1.1x the measured peak at 800x1333
PROBE_MAX_PIXELS = 400 * 667


def hf_available() -> bool:
    """Whether the HF pairs can run: transformers (and timm, their backbones' home)."""
    import importlib.util
    return all(importlib.util.find_spec(name) is not None for name in ('transformers', 'timm'))


def default_models() -> List[str]:
    return [name for name, pair in PAIRS.items() if pair.hf is None or hf_available()]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='\n'.join(__doc__.split('\n')[1:]))
    parser.add_argument('--models', nargs='+', choices=list(PAIRS), default=None,
                        help='model pairs (default: all; the HF pairs where transformers and '
                        'timm are installed)')
    parser.add_argument('--modes', nargs='+', choices=MODES, default=list(MODES))
    add_shape_arg(parser, help='input image size')
    parser.add_argument('--batch-infer', type=int, default=1, help='inference batch (1)')
    parser.add_argument('--batch-train', type=int, default=2, help='train-step batch (2)')
    add_common_args(parser, 'dtypes', 'threads', 'repeats', 'warmup', 'out_dir', 'seed')
    parser.set_defaults(dtypes=['float32', 'bfloat16'])
    parser.add_argument('--no-profile', action='store_true',
                        help='skip the per-stage profiled run')
    parser.add_argument('--no-memory-check', action='store_true',
                        help='skip the memory estimate (and its refusal) before each pair')
    parser.add_argument('--with-nchw', action='store_true',
                        help='also time ours with conv_memory_format="contiguous" (mmdet\'s NCHW '
                        'convolutions), which splits our gain into layout and attention')
    args = parser.parse_args(argv)
    args.models = args.models or default_models()
    missing = [name for name in args.models if PAIRS[name].hf and not hf_available()]
    if missing:
        parser.error(f'{", ".join(missing)} need transformers and timm: pip install '
                     '"transformers==5.23.0" timm (or the [analysis] extra)')
    bad = [d for d in args.dtypes if d not in ('float32', 'bfloat16')]
    if bad:
        parser.error(f'--dtypes: only float32 and bfloat16 (CPU autocast), got {bad}')
    if min(args.shape) < 32:
        parser.error(f'--shape must be at least 32x32, got {args.shape}')
    for name in args.models:
        if args.shape[0] * args.shape[1] < PAIRS[name].min_pixels:
            parser.error(f'--shape {args.shape[0]} {args.shape[1]} is too small for {name}: it '
                         f'needs at least {PAIRS[name].min_pixels} pixels')
    for name in ('batch_infer', 'batch_train'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1')
    return args


# -------------------------------------------------------------------------------------- memory
def extrapolate_peak(probes, pixels):
    """Fit ``c + a * p + b * p**2`` (all >= 0) through (pixels, bytes) probes; evaluate at
    ``pixels``. The constant holds what does not scale with the image (gradients, optimizer
    state, workspaces), the quadratic term all-to-all attention."""
    probes = sorted(probes)
    p = np.array([q for q, _ in probes], dtype=float)
    m = np.array([v for _, v in probes], dtype=float)
    scale = p.max()
    basis = np.stack([np.ones_like(p), p / scale, (p / scale)**2], 1)
    coef = np.linalg.lstsq(basis, m, rcond=None)[0]
    if (coef < 0).any():  # noise: keep the non-negative fit of the two largest probes
        (p1, m1), (p2, m2) = probes[-2:]
        slope = max(0.0, (m2 - m1) / (p2 - p1)) if p2 > p1 else 0.0
        coef = np.array([max(0.0, m2 - slope * p2), slope * scale, 0.0])
    x = pixels / scale
    return float(coef[0] + coef[1] * x + coef[2] * x**2)


# --------------------------------------------------------------------------------------- roofline
def _onednn_linear(a, b):
    """``a @ b`` as oneDNN's linear with a prepacked weight (what ``pack_linear`` runs), or None
    where this torch lacks the op or refuses the dtype."""
    mkldnn = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(mkldnn, '_linear_pointwise')):
        return None
    try:
        packed = mkldnn._reorder_linear_weight(b.t().contiguous(), a.shape[0])
        call = functools.partial(mkldnn._linear_pointwise, a, packed, None, 'none', [], '')
        call()
    except RuntimeError:
        return None
    return call


def machine_peaks(threads, repeats=5):
    """Measured GEMM GFLOP/s (fp32, bf16) and copy bandwidth GB/s at the current thread count.

    The GEMM figure is the faster of two 2048^3 products: ``torch.mm`` (the BLAS that
    ``nn.Linear`` calls) and oneDNN's linear with a prepacked weight (``pack_linear``'s path);
    ``gemm_source_<dtype>`` says which."""
    n = 2048
    peaks = {}
    for name, dtype in (('float32', torch.float32), ('bfloat16', torch.bfloat16)):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        out = torch.empty(n, n, dtype=dtype)
        candidates = {'torch.mm': lambda: torch.mm(a, b, out=out),
                      'oneDNN linear': _onednn_linear(a, b)}
        rates = {source: 2 * n**3 / time_call(call, repeats=repeats, warmup=1).min / 1e9
                 for source, call in candidates.items() if call is not None}
        source = max(rates, key=rates.get)
        peaks[f'gemm_gflops_{name}'] = rates[source]
        peaks[f'gemm_source_{name}'] = source
    src = torch.ones(64 * 2**20)  # 256 MiB, far past the caches
    dst = torch.empty_like(src)
    best = time_call(lambda: dst.copy_(src), repeats=repeats, warmup=1).min
    peaks['copy_gbps'] = 2 * src.numel() * src.element_size() / best / 1e9
    peaks['threads'] = threads
    return peaks


# --------------------------------------------------------------------------------------- models
def mmdet_config_path(relative):
    import mmdet
    path = osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs', relative)
    if not osp.isfile(path):
        raise FileNotFoundError(f'mmdet package config {relative} not found at {path}')
    return path


def load_cfg(path, backbone_update=None):
    from mmengine.config import Config
    cfg = Config.fromfile(path)
    cfg.model.backbone.init_cfg = None  # random init: no pretrained download
    if backbone_update:
        cfg.model.backbone.update(backbone_update)
    return cfg


@dataclass
class Variant:
    """One detector of a pair: its role (one of ``ROLES``), its label in the table, its config
    and model, and the state dict every case starts from."""
    role: str
    label: str
    cfg: Any
    model: torch.nn.Module
    state: Dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f'role must be one of {ROLES}, got {self.role!r}')


def build_pair(pair: Pair, with_nchw=False) -> Tuple[List[Variant], str]:
    """The stock and our variant from one set of weights, and the load report.

    With ``with_nchw``, and where our detector takes ``conv_memory_format``, a third variant:
    ours with NCHW convolutions (mmdet's layout), same weights.
    """
    from mmdet.registry import MODELS
    stock_cfg = load_cfg(mmdet_config_path(pair.stock), pair.stock_backbone)
    ours_cfg = load_cfg(get_config_path(pair.ours))
    # Copied before the build: mmdet's detectors edit their cfg in place.
    nchw_cfg = copy.deepcopy(ours_cfg) if with_nchw else None
    torch.manual_seed(0)
    stock = MODELS.build(stock_cfg.model)
    stock.init_weights()
    ours = MODELS.build(ours_cfg.model)
    ours.init_weights()
    state = stock.state_dict()
    if pair.strict:
        ours.load_state_dict(state, strict=True)
        report = 'strict'
    else:
        result = ours.load_state_dict(state, strict=False)
        new_keys, dropped_keys = ours.backbone.resnet_key_diff()
        expected_missing = {f'backbone.{k}' for k in new_keys}
        expected_unexpected = {f'backbone.{k}' for k in dropped_keys}
        if (set(result.missing_keys) != expected_missing
                or set(result.unexpected_keys) != expected_unexpected):
            raise RuntimeError(f'{pair.ours}: unexpected key difference to {pair.stock}: '
                               f'missing {result.missing_keys}, '
                               f'unexpected {result.unexpected_keys}')
        report = (f'shared keys; {len(new_keys)} BoT tensors own init, {len(dropped_keys)} '
                  'R50 conv2 dropped')
    variants = [Variant('stock', pair.stock_label, stock_cfg, stock),
                Variant('ours', pair.ours_label, ours_cfg, ours)]
    if nchw_cfg is not None and hasattr(ours, 'conv_memory_format'):
        nchw_cfg.model.conv_memory_format = 'contiguous'
        nchw = MODELS.build(nchw_cfg.model)
        nchw.load_state_dict(ours.state_dict(), strict=True)
        variants.append(Variant('ours NCHW', f'{pair.ours_label}, NCHW convs', nchw_cfg, nchw))
    for variant in variants:
        variant.state = copy.deepcopy(variant.model.state_dict())
    return variants, report


# ------------------------------------------------------------------------------ HF transformers
def hf_config(kind: str):
    """An HF config of the hub's model (random init, no download): facebook/detr-resnet-50 /
    SenseTime/deformable-detr -- timm ResNet-50, 91 COCO-id labels, the classes' defaults."""
    import transformers
    labels = dict(id2label={i: f'class_{i}' for i in range(91)},
                  label2id={f'class_{i}': i for i in range(91)})
    if kind == 'detr':
        backbone = transformers.TimmBackboneConfig(backbone='resnet50', out_indices=[4],
                                                   features_only=True)
        return transformers.DetrConfig(backbone_config=backbone, **labels)
    backbone = transformers.TimmBackboneConfig(backbone='resnet50', out_indices=[2, 3, 4],
                                               features_only=True)
    return transformers.DeformableDetrConfig(backbone_config=backbone, **labels)


class HFDetector(torch.nn.Module):
    """An HF transformers ``*ForObjectDetection`` behind the interface this tool times.

    ``test_step(data)`` does what our ``test_step`` does, HF's way: the same preprocessing as
    mmdet's data preprocessor (BGR -> RGB, normalise with the converted config's mean/std, zero
    padding bottom-right, HF's ``pixel_mask``), HF's forward on its CPU path (transformers' own
    PyTorch code: grid_sample deformable attention), and its image processor's
    ``post_process_object_detection`` (top 100). Its stages are exposed under our names
    (``backbone``, ``neck`` = the input projections, ``encoder``, ``decoder``, ``bbox_head`` =
    the class and box layers, with the post-processing timed as 'head' too) for the profile.
    """

    def __init__(self, hf_model, kind: str, mean, std):
        super().__init__()
        import transformers
        self.hf = hf_model
        inner = hf_model.model
        self.backbone, self.encoder, self.decoder = inner.backbone, inner.encoder, inner.decoder
        self.neck = inner.input_projection if kind == 'detr' else inner.input_proj
        self.bbox_head = torch.nn.ModuleList(
            [hf_model.class_labels_classifier, hf_model.bbox_predictor] if kind == 'detr' else
            [*hf_model.class_embed, *hf_model.bbox_embed])
        processor = (transformers.DetrImageProcessor if kind == 'detr'
                     else transformers.DeformableDetrImageProcessor)
        self.processor = processor()
        self.register_buffer('mean', torch.tensor(mean).view(3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std).view(3, 1, 1), persistent=False)

    def test_step(self, data):
        images = data['inputs']
        height = max(image.shape[-2] for image in images)
        width = max(image.shape[-1] for image in images)
        pixels = torch.zeros(len(images), 3, height, width)
        mask = torch.zeros(len(images), height, width, dtype=torch.long)
        for index, image in enumerate(images):
            h, w = image.shape[-2:]
            pixels[index, :, :h, :w] = (image.flip(0).float() - self.mean) / self.std
            mask[index, :h, :w] = 1
        outputs = self.hf(pixel_values=pixels, pixel_mask=mask)
        return ranged('head', self.processor.post_process_object_detection)(
            outputs, threshold=0.0, target_sizes=[tuple(image.shape[-2:]) for image in images])


def build_hf_pair(pair: Pair, with_nchw=False) -> Tuple[List[Variant], str]:
    """HF's model (random init, the hub model's config) and ours converted from its
    ``save_pretrained`` folder by ``mmdet_detrx.converters.convert`` -- the user's path."""
    import tempfile

    import transformers
    from mmdet.registry import MODELS
    from mmengine.config import Config

    from mmdet_detrx.converters import convert_source
    from mmdet_detrx.converters._convert import build_model_from_config
    from mmdet_detrx.utils.safe_checkpoint import load_checkpoint_file
    torch.manual_seed(0)
    model_class = (transformers.DetrForObjectDetection if pair.hf == 'detr'
                   else transformers.DeformableDetrForObjectDetection)
    hf_model = model_class(hf_config(pair.hf)).eval()
    with tempfile.TemporaryDirectory(prefix='benchmark-hf-') as tmp:
        hf_model.save_pretrained(osp.join(tmp, 'hf'))
        result = convert_source(osp.join(tmp, 'hf'), osp.join(tmp, 'ours'))
        # Read before the build: mmdet's detectors edit their cfg in place.
        nchw_cfg = Config.fromfile(result.config_path) if with_nchw else None
        ours, ours_cfg = build_model_from_config(result.config_path)
        state = load_checkpoint_file(result.checkpoint_path)['state_dict']
    ours.load_state_dict(state, strict=True)
    pre = ours_cfg.model.data_preprocessor
    stock = HFDetector(hf_model, pair.hf, pre.mean, pre.std)
    variants = [Variant('stock', pair.stock_label, None, stock),
                Variant('ours', pair.ours_label, ours_cfg, ours)]
    if nchw_cfg is not None and hasattr(ours, 'conv_memory_format'):
        nchw_cfg.model.conv_memory_format = 'contiguous'
        nchw = MODELS.build(nchw_cfg.model)
        nchw.load_state_dict(state, strict=True)
        variants.append(Variant('ours NCHW', f'{pair.ours_label}, NCHW convs', nchw_cfg, nchw))
    for variant in variants:
        variant.state = copy.deepcopy(variant.model.state_dict())
    return variants, f'converted ({result.layout}, strict)'


def synthetic_batch(batch, shape, training, with_masks, seed):
    """``test_step``/``train_step`` input: smooth images with flat boxes (= the ground truth)."""
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    height, width = shape
    generator = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    ys = torch.linspace(0, 1, height)[:, None]
    xs = torch.linspace(0, 1, width)[None, :]
    for index in range(batch):
        colour = torch.rand(3, 1, 1, generator=generator)
        image = (colour * 0.5 + 0.25 * (ys + xs)).expand(3, height, width).clone()
        num_boxes = 4
        x1 = torch.rand(num_boxes, generator=generator) * width * 0.6
        y1 = torch.rand(num_boxes, generator=generator) * height * 0.6
        x2 = (x1 + width * (0.1 + 0.3 * torch.rand(num_boxes, generator=generator))).clamp(
            max=width - 1)
        y2 = (y1 + height * (0.1 + 0.3 * torch.rand(num_boxes, generator=generator))).clamp(
            max=height - 1)
        boxes = torch.stack([x1, y1, x2, y2], 1).floor()
        masks = np.zeros((num_boxes, height, width), dtype=np.uint8)
        for k, (a, b, c, d) in enumerate(boxes.long().tolist()):
            image[:, b:d + 1, a:c + 1] = torch.rand(3, 1, 1, generator=generator)
            masks[k, b:d + 1, a:c + 1] = 1
        inputs.append((image * 255).round().to(torch.uint8))
        sample = DetDataSample(metainfo=dict(
            img_id=index, img_path=f'synthetic_{index}.png', img_shape=(height, width),
            ori_shape=(height, width), scale_factor=(1.0, 1.0), flip=False,
            flip_direction=None))
        if training:
            instances = InstanceData(
                bboxes=boxes, labels=torch.randint(0, 80, (num_boxes, ), generator=generator))
            if with_masks:
                instances.masks = BitmapMasks(masks, height, width)
            sample.gt_instances = instances
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def optim_wrapper_for(model, cfg, dtype):
    from mmengine.optim import build_optim_wrapper

    from mmdet_detrx.engine.optimizers import amp_optim_wrapper_cfg
    optim_cfg = copy.deepcopy(cfg.optim_wrapper)
    if dtype == 'bfloat16':  # tools/train.py --amp on CPU
        optim_cfg = amp_optim_wrapper_cfg(optim_cfg, device='cpu')
    return build_optim_wrapper(model, optim_cfg)


def make_step(model, cfg, mode, dtype, data):
    """A zero-argument callable running one inference (``test_step``) or one train step."""
    if mode == 'infer':
        autocast = torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == 'bfloat16')

        def step():
            with torch.no_grad(), autocast:
                return model.test_step(data)

        return step
    wrapper = optim_wrapper_for(model, cfg, dtype)
    wrapper.backward = ranged('backward', wrapper.backward)
    wrapper.step = ranged('optimizer', wrapper.step)

    def step():
        return model.train_step(data, wrapper)

    return step


# --------------------------------------------------------------------------------------- ranges
_open_ranges: Dict[str, int] = {}


def ranged(name, fn):
    """``fn`` inside ``record_function(name)``; nested calls of the same name open no range."""

    def wrapper(*args, **kwargs):
        if _open_ranges.get(name):
            return fn(*args, **kwargs)
        _open_ranges[name] = 1
        try:
            with torch.profiler.record_function(name):
                return fn(*args, **kwargs)
        finally:
            _open_ranges[name] = 0

    wrapper.__wrapped__ = fn
    return wrapper


@contextlib.contextmanager
def stage_ranges(model):
    """Wrap the detector's stages and attention modules in named profiler ranges."""
    wrapped = []

    def wrap(module, method, name):
        if not hasattr(type(module), method) or (module, method) in wrapped:
            return
        setattr(module, method, ranged(name, getattr(module, method)))
        wrapped.append((module, method))

    for stage, (attributes, methods) in STAGE_MODULES.items():
        for attribute in attributes:
            module = getattr(model, attribute, None)
            # a ModuleList stage (the HF pairs' input projections, heads): each of its modules
            parts = list(module) if isinstance(module, torch.nn.ModuleList) else [module]
            for part in parts:
                if isinstance(part, torch.nn.Module):
                    for method in methods:
                        wrap(part, method, stage)
    for module in model.modules():
        if type(module).__name__ in ATTENTION_CLASSES:
            wrap(module, 'forward', 'attention')
    try:
        yield
    finally:
        for module, method in wrapped:
            delattr(module, method)  # the class's method shows through again


def profile_shares(step, model):
    """One run under torch.profiler: {stage: share of the step} (plus 'other')."""
    names = STAGES + ('attention', 'backward', 'optimizer')
    with stage_ranges(model), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.profiler.record_function('step'):
            step()
    totals = {evt.key: evt.cpu_time_total for evt in prof.key_averages() if evt.key in
              names + ('step', )}
    total = totals.get('step') or 1.0
    shares = {name: totals.get(name, 0.0) / total for name in names}
    covered = sum(shares[name] for name in STAGES + ('backward', 'optimizer'))
    shares['other'] = max(0.0, 1.0 - covered)
    return shares


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker: every FLOP goes to 'Global'."""
    parents = ('Global', )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def count_flops_and_capture(step, model):
    """Run ``step`` once counting FLOPs; also return the encoder's output (or None)."""
    from mmdet_detrx.utils.complexity import flop_counter_mode
    captured = {}
    handle = None
    encoder = getattr(model, 'encoder', None)

    def keep(module, inputs, output):  # returns None: the encoder's output is not replaced
        if not isinstance(output, torch.Tensor):  # HF encoders return a ModelOutput
            output = output[0]
        captured.setdefault('encoder', output.detach().float().clone())

    if isinstance(encoder, torch.nn.Module):
        handle = encoder.register_forward_hook(keep)
    try:
        counter = flop_counter_mode(display=False)
        # Its per-module tracker hooks autograd and asserts on parameters used under no_grad
        # (mmdet's query embeddings); only the global total is needed here.
        counter.mod_tracker = _GlobalOnly()
        try:
            with counter:
                step()
            flops = counter.get_total_flops()
        except Exception as error:  # an op the counter cannot trace: warm up without it
            print(f'FLOP counting failed ({type(error).__name__}: {error}); not reported',
                  file=sys.stderr)
            captured.clear()
            step()
            flops = None
    finally:
        if handle is not None:
            handle.remove()
    return flops, captured.get('encoder')


# ------------------------------------------------------------------------------------- benchmark
def estimate_memory(variants, mode, shape, batch, with_masks, seed, min_pixels):
    """Extrapolated peak growth (bytes) of each variant's ``mode`` step at ``shape``."""
    height, width = shape
    pixels = height * width
    top = max(min(pixels / 4, PROBE_MAX_PIXELS), min(min_pixels, pixels))
    low = max(top / 16, min(min_pixels, pixels))
    sizes = sorted({top, low, (top * low)**0.5}) if low < top else [top]
    estimates = []
    for variant in variants:
        model = variant.model
        probes = []
        for probe_pixels in sizes:
            scale = (probe_pixels / pixels)**0.5
            probe_shape = (max(32, math.ceil(height * scale)), max(32, math.ceil(width * scale)))
            data = synthetic_batch(batch, probe_shape, mode == 'train', with_masks, seed)
            model.load_state_dict(variant.state)
            model.train(mode == 'train')
            step = make_step(model, variant.cfg, mode, 'float32', data)
            meter = PeakMemory()
            meter.start()
            step()
            probes.append((probe_shape[0] * probe_shape[1], meter.stop()))
            del step, data
        extra = 2 * sum(p.numel() for p in model.parameters())  # bf16 weight copies (autocast)
        if len(probes) == 1:  # the input itself is the probe: proportional, no constant
            grown = probes[0][1] * pixels / probes[0][0]
        else:
            grown = extrapolate_peak(probes, pixels)
        estimates.append(grown + extra)
    for variant in variants:
        variant.model.load_state_dict(variant.state)
    return estimates


@dataclass
class Case:
    """One cell of the benchmark: a pair's variants in one mode, dtype and thread count on one
    input batch, with the run settings and what every row of it repeats."""
    pair: str
    variants: List[Variant]
    mode: str
    dtype: str
    threads: int
    batch: int
    shape: Tuple[int, int]
    data: Dict[str, Any]
    machine_peaks: Dict[str, Any]  # measured GEMM GFLOP/s and copy GB/s at these threads
    weights: str  # how our variant got the stock weights (build_pair's report)
    repeats: int
    warmup: int
    seed: int
    profile: bool = True
    measure_memory: bool = True
    compare_encoder: bool = True  # ours' encoder output against stock's (fp32 inference)

    def base_row(self) -> Dict[str, Any]:
        return dict(pair=self.pair, mode=self.mode, dtype=self.dtype, threads=self.threads,
                    batch=self.batch, shape=f'{self.shape[0]}x{self.shape[1]}',
                    weights=self.weights)

    def status_rows(self, status: str) -> List[Dict[str, Any]]:
        """A row per variant saying why the case did not run."""
        return [dict(self.base_row(), impl=v.label, role=v.role, status=status)
                for v in self.variants]


def run_pair(args, name, pair, peaks_by_threads, log):
    log(f'== {name}: building {pair.stock} and {pair.ours}')
    build = build_hf_pair if pair.hf else build_pair
    variants, load_report = build(pair, args.with_nchw)
    with_masks = 'mask' in pair.stock
    rows = []
    measure_memory = PeakMemory.supported()
    shape = tuple(args.shape)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for mode in args.modes:
            if pair.hf and mode != 'infer':
                log(f'   {mode}: skipped (the HF pairs time inference only)')
                continue
            batch = args.batch_infer if mode == 'infer' else args.batch_train
            refused = None
            if not args.no_memory_check and measure_memory:
                estimates = estimate_memory(variants, mode, shape, batch, with_masks, args.seed,
                                            pair.min_pixels)
                need, available = MEMORY_MARGIN * max(estimates), memory_available_bytes()
                log(f'   {mode}: estimated peak growth '
                    f'{", ".join(f"{e / 2**30:.2f}" for e in estimates)} GiB '
                    f'(available {available / 2**30:.1f} GiB)')
                if need > available:
                    refused = (f'refused: estimated {need / 2**30:.1f} GiB (x{MEMORY_MARGIN} '
                               f'margin) > {available / 2**30:.1f} GiB available')
                    print(f'{name} {mode} {shape[0]}x{shape[1]} batch {batch}: '
                          f'{refused}; choose a smaller --shape', file=sys.stderr)
            data = synthetic_batch(batch, shape, mode == 'train', with_masks, args.seed)
            for dtype in args.dtypes:
                case = Case(pair=name, variants=variants, mode=mode, dtype=dtype,
                            threads=threads, batch=batch, shape=shape, data=data,
                            machine_peaks=peaks_by_threads[threads], weights=load_report,
                            repeats=args.repeats, warmup=args.warmup, seed=args.seed,
                            profile=not args.no_profile, measure_memory=measure_memory,
                            compare_encoder=pair.compare_encoder)
                if refused:
                    rows += case.status_rows(refused)
                    continue
                try:
                    rows += run_case(case, log)
                except Exception as exc:  # one case failing must not lose the others' rows
                    failed = f'failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}'
                    log(f'   {mode} {dtype} {threads}T: {failed}')
                    rows += case.status_rows(failed)
    del variants
    gc.collect()
    return rows


def run_case(case: Case, log) -> List[Dict[str, Any]]:
    """Time the case's variants interleaved; a row per variant (see the module docstring)."""
    steps, flops, encoders = {}, {}, {}
    for variant in case.variants:
        variant.model.load_state_dict(variant.state)
        variant.model.train(case.mode == 'train')
        torch.manual_seed(case.seed)
        steps[variant.role] = make_step(variant.model, variant.cfg, case.mode, case.dtype,
                                        case.data)
        flops[variant.role], encoders[variant.role] = count_flops_and_capture(
            steps[variant.role], variant.model)
    timings = time_calls(steps, repeats=case.repeats, warmup=max(0, case.warmup - 1))
    # Memory in one more run each, not in the timed ones: measuring starts with malloc_trim,
    # which hands the heap back, so a timed run would fault it all in again (tune_malloc).
    meters = {variant.role: PeakMemory() for variant in case.variants}
    if case.measure_memory:
        for role, step in steps.items():
            meters[role].start()
            step()
            meters[role].stop()
    shares = {}
    if case.profile:
        for variant in case.variants:
            shares[variant.role] = profile_shares(steps[variant.role], variant.model)
    rows = []
    gemm_peak = case.machine_peaks[f'gemm_gflops_{case.dtype}']
    reference = encoders.get('stock')
    for variant in case.variants:
        role, timing = variant.role, timings[variant.role]
        row = dict(case.base_row(), impl=variant.label, role=role, status='ok',
                   median_s=timing.median, min_s=timing.min,
                   gflop=flops[role] / 1e9 if flops[role] else None)
        if row['gflop']:
            row['gflops_per_s'] = row['gflop'] / timing.median
            row['pct_gemm_peak'] = 100 * row['gflops_per_s'] / gemm_peak
        if case.measure_memory:
            row['peak_mib'] = meters[role].peak / 2**20
        for stage, share in shares.get(role, {}).items():
            row[f'share_{stage}'] = 100 * share
        encoder = encoders[role]
        if (case.compare_encoder and case.mode == 'infer' and case.dtype == 'float32'
                and reference is not None and encoder is not None
                and encoder.shape == reference.shape):
            row['encoder_rel_diff'] = ((encoder - reference).norm() /
                                       reference.norm().clamp_min(1e-12)).item()
        rows.append(row)
        log(f'   {case.mode} {case.dtype} {case.threads}T {variant.label}: '
            f'{timing.median:.3f} s (min {timing.min:.3f})'
            + (f', peak +{row["peak_mib"]:.0f} MiB' if case.measure_memory else ''))
    del steps
    return rows


def add_ratios(rows):
    """Speed-up and memory ratio of every row to the stock fp32 row of its (pair, mode, threads)."""
    stock = {(row['pair'], row['mode'], row['threads']): row for row in rows
             if row.get('status') == 'ok' and row['dtype'] == 'float32' and row['role'] == 'stock'}
    for row in rows:
        ref = stock.get((row['pair'], row['mode'], row['threads']))
        if ref is None or row.get('status') != 'ok':
            continue
        row['speedup_vs_stock_fp32'] = ref['median_s'] / row['median_s']
        if row.get('peak_mib') and ref.get('peak_mib'):
            row['memory_vs_stock_fp32'] = row['peak_mib'] / ref['peak_mib']


SHORT = dict(encoder='enc', decoder='dec')
COLUMNS = [
    Column('pair', align='left'), Column('impl', align='left'), Column('mode', align='left'),
    Column('dtype', align='left'), Column('threads', 'thr'), Column('batch', 'B'),
    Column('median_s', 'median (s)', '{:.3f}'), Column('min_s', 'min (s)', '{:.3f}'),
    Column('speedup_vs_stock_fp32', 'x stock fp32', '{:.2f}x'),
    Column('gflop', 'GFLOP', '{:.0f}'), Column('pct_gemm_peak', '% GEMM peak', '{:.0f}%'),
    Column('peak_mib', 'peak mem (MiB)', '{:.0f}'),
    Column('memory_vs_stock_fp32', 'mem x stock', '{:.2f}x'),
    *[Column(f'share_{s}', SHORT.get(s, s), '{:.0f}%') for s in STAGES + ('other', )],
    Column('share_attention', 'attn', '{:.0f}%'),
    Column('share_backward', 'bwd', '{:.0f}%'),
    Column('encoder_rel_diff', 'enc. rel. diff', '{:.1e}'),
    Column('status', align='left'),
]


def save_chart(rows, path, title):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get('status') == 'ok']
    modes = list(dict.fromkeys(r['mode'] for r in ok))
    panels = [(mode, field) for mode in modes for field in ('median_s', 'peak_mib')
              if any(r.get(field) for r in ok if r['mode'] == mode)]
    if not panels:
        return None
    nrows, ncols = panel_grid(len(panels), max_cols=2)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7 * ncols, 4.5 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis('off')
    for ax, (mode, field) in zip(axes.flat, panels):
        subset = [r for r in ok if r['mode'] == mode]
        groups = list(dict.fromkeys(f'{r["pair"]}\n{r["threads"]}T' for r in subset))
        values, series = {}, []
        for r in subset:
            group = f'{r["pair"]}\n{r["threads"]}T'
            name = f'{r["role"]} {r["dtype"]}'
            series.append(name)
            values[(group, name)] = r.get(field)
        series = list(dict.fromkeys(series))
        is_time = field == 'median_s'
        bar_chart(ax, groups, series, values, baseline='stock float32',
                  ratio='speedup' if is_time else 'relative',
                  ylabel='seconds (median)' if is_time else 'peak memory growth (MiB)',
                  title=f'{mode}: {"time" if is_time else "memory"} '
                  f'({"stock fp32 / bar" if is_time else "bar / stock fp32"} on bars)')
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    args = parse_args(argv)
    import logging
    from mmdet.utils import register_all_modules
    from mmengine.logging import MMLogger
    import mmdet_detrx  # noqa: F401  (registers our models, MSDeformAttn, CPUAmpOptimWrapper)
    register_all_modules(init_default_scope=True)
    MMLogger.get_current_instance().setLevel(logging.WARNING)  # paramwise_cfg lists every param
    args.threads = list(dict.fromkeys(args.threads or [torch.get_num_threads()]))

    def log(message):
        print(message, file=sys.stderr, flush=True)

    _, malloc_line = tune_malloc()  # as our train/test tools run; MMDET_DETRX_MALLOC=default
    log(malloc_line)
    peaks_by_threads = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        peaks_by_threads[threads] = machine_peaks(threads)
        p = peaks_by_threads[threads]
        log(f'{threads} threads: GEMM {p["gemm_gflops_float32"]:.0f} GFLOP/s fp32, '
            f'{p["gemm_gflops_bfloat16"]:.0f} GFLOP/s bf16; copy {p["copy_gbps"]:.1f} GB/s')
    machine = machine_line()
    if not PeakMemory.supported():
        log('peak memory: not measured (needs Linux /proc/self/clear_refs)')

    rows = []
    for name in args.models:
        rows += run_pair(args, name, PAIRS[name], peaks_by_threads, log)
    add_ratios(rows)

    peak_lines = [f'- {t} threads: GEMM (2048^3) {p["gemm_gflops_float32"]:.0f} GFLOP/s fp32 '
                  f'({p["gemm_source_float32"]}), {p["gemm_gflops_bfloat16"]:.0f} GFLOP/s bf16 '
                  f'({p["gemm_source_bfloat16"]}); memory copy '
                  f'{p["copy_gbps"]:.1f} GB/s' for t, p in peaks_by_threads.items()]
    header = '\n'.join([
        f'Machine: {machine}.', f'{malloc_line[0].upper()}{malloc_line[1:]}.',
        'Measured limits:', *peak_lines, '',
        f'Input {args.shape[0]}x{args.shape[1]}; median of {args.repeats} after '
        f'{max(1, args.warmup)} warm-up; same weights; stages: share of one profiled step; '
        'peak mem: resident-set growth during one more run.', ''])
    table = markdown_table(rows, COLUMNS)
    print(header + '\n' + table)
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        stem = osp.join(args.out_dir, 'benchmark_detectors')
        with open(stem + '.md', 'w') as f:
            f.write(header + '\n' + table + '\n')
        write_csv([dict(r, machine=machine) for r in rows], stem + '.csv')
        png = save_chart(rows, stem + '.png', f'{args.shape[0]}x{args.shape[1]}, {machine}')
        log(f'wrote {stem}.md, {stem}.csv' + (f', {png}' if png else ''))
    if any(r.get('status', 'ok') != 'ok' for r in rows):
        return 3
    return 0


if __name__ == '__main__':
    sys.exit(main())
