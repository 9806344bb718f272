"""Export a DETR-family detector to ONNX: ``input -> (dets, labels)``.

The graph is :mod:`.detection_export_wrapper`'s forward.

Exporter: PyTorch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``). mmdet
3.3's DETR code is written for it: spatial shapes come from ``torch._shape_as_tensor`` and the
reference points from ``torch.linspace`` over traced sizes, so one trace gives a graph valid for
any image size (``dynamic=True``). The torch.export-based exporter (``dynamo=True``, the default
since torch 2.9) cannot export it: those loops turn sizes read from tensors into unbacked
symbols and fail on data-dependent guards. ``torch.onnx.is_in_onnx_export()`` is True only in the
TorchScript exporter; mmdet relies on it to drop the padding masks of a batch of equal images.

Multi-scale deformable attention (``msda``):

the op's own ONNX lowering (:mod:`mmdet_detrx.ops.ms_deform_attn_onnx`), selected with
``ms_deform_attn_onnx_lowering(msda)`` around the export; mmcv's own modules are computed by our
op in a copy of the model (:func:`.msda_export_mode.with_native_msda`).

* ``'trt-plugin'``: one ``trt::MultiscaleDeformableAttnPlugin_TRT`` node per attention
  (:mod:`.msda_plugin`), for TensorRT. ONNX Runtime cannot run it.
* ``'grid_sample'``: GridSample and standard ops per attention and level (opset >= 16), the
  graph :mod:`.msda_decomposition` also makes of plugin nodes; runs in ONNX Runtime.

ACT's clustered attention (``AdaptiveClusteringAttention``) does not export: the number of
clusters is found per image (``torch.unique`` and Python-side grouping on tensor values), which
a trace freezes to the traced image's clusters. Its layers are exported in exact mode (full
softmax attention with the same weights), with a warning.

The ONNX file is written to a temporary file next to ``out_file`` and renamed only after the
checks passed, so a failed export leaves no file behind; the temporary files of an export that
was killed are removed by the next export into the same folder (named after host and process,
only when that process no longer exists).
"""
import contextlib
import os
import os.path as osp
import re
import socket
import tempfile
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence, Tuple

import onnx
import torch
from mmcv.ops import DeformConv2d, ModulatedDeformConv2d
from mmdet.models.detectors.base_detr import DetectionTransformer
from torch import nn

from mmdet_detrx.models.layers import (AdaptiveClusteringAttention, BottleneckAttention,
                                       act_exact_mode)
from mmdet_detrx.utils.file_mode import current_umask
from .detection_export_wrapper import DetectionExportWrapper
from .linspace_symbolic import fixed_linspace_symbolic
from mmdet_detrx.ops import ms_deform_attn_onnx_lowering
from .msda_decomposition import GRID_SAMPLE_MIN_OPSET, count_plugin_nodes
from .msda_export_mode import msda_modules, with_native_msda
from .msda_plugin import PLUGIN_DOMAIN, strip_plugin_attributes

__all__ = ['MSDA_MODES', 'OnnxExportError', 'OnnxExportSummary', 'export_detector_onnx',
           'DEFAULT_OPSET', 'MAX_OPSET']

MSDA_MODES = ('grid_sample', 'trt-plugin')
DEFAULT_OPSET = 17
MIN_OPSET = 11
# The TorchScript exporter of torch 2.13 goes to opset 20, but from 18 on it fails on every
# DETR-family detector we export except plain DETR/ACT: an internal assert in its shape inference
# (`axes_vector.size() <= input_shape.size()`) on the strided in-place box rescaling of mmdet's
# DETRHead._predict_by_feat_single (opset 18 turned Slice/Reduce axes into inputs). 17 is the
# newest opset that works for all of them (tests/test_deploy/test_onnx_export.py).
MAX_OPSET = 17
INPUT_NAME, OUTPUT_NAMES = 'input', ('dets', 'labels')
# mmcv ops whose ONNX form is an mmcv-domain node that neither ONNX Runtime nor TensorRT runs.
_UNSUPPORTED_MODULES = (DeformConv2d, ModulatedDeformConv2d)


class OnnxExportError(RuntimeError):
    """The model, or an argument, cannot be exported; the message says which and why."""


# Temporary files are named after the exporting process: .detrx-{export,final}.HOST.PID.*.onnx
_TEMPORARY = re.compile(r'^\.detrx-(?:export|final)\.(\w+)\.(\d+)\..*\.onnx$')


def _host() -> str:
    return re.sub(r'\W', '_', socket.gethostname()) or 'host'


def _temporary_prefix(kind: str) -> str:
    return f'.detrx-{kind}.{_host()}.{os.getpid()}.'


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove_stale_temporaries(out_dir: str) -> None:
    """Remove the temporary files of exports into ``out_dir`` that were killed: ours (by name),
    from this host, whose process no longer exists. A live export's files are left alone."""
    for name in os.listdir(out_dir):
        match = _TEMPORARY.match(name)
        if match and match.group(1) == _host() and not _pid_alive(int(match.group(2))):
            try:
                os.remove(osp.join(out_dir, name))
            except OSError:
                pass


@dataclass
class OnnxExportSummary:
    out_file: str
    opset: int
    msda: str
    dynamic: bool
    input_shape: Tuple[int, int, int, int]
    num_msda_modules: int
    num_plugin_nodes: int
    num_grid_sample_nodes: int
    act_exact_layers: int
    num_nodes: int


def _check_arguments(model, input_shape, msda, opset) -> None:
    if not isinstance(model, DetectionTransformer):
        raise OnnxExportError(
            f'{type(model).__name__} is not supported: ONNX export supports mmdet DETR-family '
            'detectors (DetectionTransformer subclasses: DETR, Conditional DETR, Deformable '
            'DETR, DINO and our *X variants, with any backbone, e.g. BoTNet)')
    for name, module in model.named_modules():
        if isinstance(module, _UNSUPPORTED_MODULES):
            raise OnnxExportError(
                f'{name} ({type(module).__name__}) is not supported: its ONNX form is an mmcv '
                'custom op that ONNX Runtime and TensorRT cannot run')
    if msda not in MSDA_MODES:
        raise OnnxExportError(f'msda must be one of {MSDA_MODES}, got {msda!r}')
    if isinstance(opset, bool) or not isinstance(opset, int) or not (
            MIN_OPSET <= opset <= MAX_OPSET):
        raise OnnxExportError(f'opset must be an int in [{MIN_OPSET}, {MAX_OPSET}] (what the '
                              f'TorchScript ONNX exporter of torch {torch.__version__} exports '
                              f'our detectors with; 18-20 hit an exporter assert), got {opset!r}')
    if msda == 'grid_sample' and msda_modules(model) and opset < GRID_SAMPLE_MIN_OPSET:
        raise OnnxExportError(
            f'opset {opset} is too old for --msda grid_sample: the multi-scale deformable '
            f'attention decomposition uses GridSample, which needs opset >= '
            f'{GRID_SAMPLE_MIN_OPSET} (or use --msda trt-plugin)')
    if (len(input_shape) != 4 or input_shape[1] != 3
            or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0
                   for s in input_shape)):
        raise OnnxExportError(f'input_shape must be (N, 3, H, W) positive ints, got '
                              f'{tuple(input_shape)}')


@contextlib.contextmanager
def _unchunked_bottleneck_attention(model: nn.Module) -> Iterator[None]:
    """BoTNet attention without query chunking: the same values, one graph for every size.

    The chunk loop's trip count and bounds are Python ints derived from the feature-map size,
    which a trace would freeze; unchunked, the attention is a single traced computation.
    """
    modules = [m for m in model.modules() if isinstance(m, BottleneckAttention)]
    previous = [m.query_chunk_size for m in modules]
    try:
        for module in modules:
            module.query_chunk_size = None
        yield
    finally:
        for module, value in zip(modules, previous):
            module.query_chunk_size = value


def _foreign_nodes(model_proto: onnx.ModelProto, allowed_domains: Sequence[str]):
    return sorted({f'{n.domain}::{n.op_type}' for n in model_proto.graph.node
                   if n.domain not in ('', 'ai.onnx', *allowed_domains)})


def export_detector_onnx(model: nn.Module,
                         out_file: str,
                         input_shape: Sequence[int] = (1, 3, 800, 1333),
                         dynamic: bool = False,
                         msda: str = 'grid_sample',
                         opset: int = DEFAULT_OPSET) -> OnnxExportSummary:
    """Export ``model`` (an mmdet DETR-family detector) to ``out_file``.

    Args:
        model: the detector, weights loaded. Exported on CPU in eval mode (restored after).
        input_shape: (N, 3, H, W) of the traced input; N is fixed in the graph.
        dynamic: make H and W dynamic (``input`` axes 2 and 3 named ``height`` / ``width``).
        msda: ``'grid_sample'`` or ``'trt-plugin'``, see the module docstring.
        opset: ONNX opset, in [11, 17]; >= 16 for ``msda='grid_sample'`` when the model has a
            deformable attention.

    Returns:
        OnnxExportSummary with the counts checked: one plugin node per deformable attention
        module (``trt-plugin``), none left and one GridSample per attention and level
        (``grid_sample``).

    Raises:
        OnnxExportError: unsupported model/component, bad argument, or failed export; no file is
            left at ``out_file`` (an existing one is not touched).
    """
    input_shape = tuple(input_shape)
    _check_arguments(model, input_shape, msda, opset)
    out_file = osp.abspath(out_file)
    out_dir = osp.dirname(out_file)
    if not osp.isdir(out_dir):
        raise OnnxExportError(f'output directory does not exist: {out_dir}')

    act_layers = [m for m in model.modules()
                  if isinstance(m, AdaptiveClusteringAttention) and not m.use_exact]
    if act_layers:
        warnings.warn(
            f'{len(act_layers)} AdaptiveClusteringAttention layer(s): ACT\'s clustered attention '
            'does not export to ONNX (the number of clusters is data-dependent: torch.unique and '
            'Python-side grouping on tensor values, which a trace would freeze to the traced '
            "image's clusters). Exporting them as exact softmax attention with the same weights "
            '(act_exact_mode).', UserWarning, stacklevel=2)

    was_training = model.training
    device = next(model.parameters()).device
    model.cpu().eval()
    export_model = with_native_msda(model)  # model itself unless it has mmcv's attentions
    num_msda = len(msda_modules(export_model))
    wrapper = DetectionExportWrapper(export_model)
    dummy = torch.randn(input_shape, generator=torch.Generator().manual_seed(0))
    dynamic_axes = {INPUT_NAME: {2: 'height', 3: 'width'}} if dynamic else None

    _remove_stale_temporaries(out_dir)
    fd, tmp_export = tempfile.mkstemp(prefix=_temporary_prefix('export'), suffix='.onnx',
                                      dir=out_dir)
    os.close(fd)
    fd, tmp_final = tempfile.mkstemp(prefix=_temporary_prefix('final'), suffix='.onnx',
                                     dir=out_dir)
    os.close(fd)
    try:
        with act_exact_mode(export_model, True), ms_deform_attn_onnx_lowering(msda), \
                _unchunked_bottleneck_attention(export_model), fixed_linspace_symbolic(opset), \
                torch.no_grad(), warnings.catch_warnings():
            # TracerWarnings flag Python values taken from tensors; mmdet's DETR code has
            # several that are constant for a given model (number of levels, queries), and the
            # dynamic-shape parity test is what proves the graph is size-independent.
            warnings.simplefilter('ignore', torch.jit.TracerWarning)
            warnings.filterwarnings('ignore', message='.*legacy TorchScript-based ONNX export')
            warnings.filterwarnings('ignore', message='.*feature will be removed')
            try:
                torch.onnx.export(
                    wrapper, (dummy, ), tmp_export, dynamo=False, opset_version=opset,
                    input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                    dynamic_axes=dynamic_axes, do_constant_folding=True)
            except Exception as error:  # the exporter names the op/function it cannot export
                raise OnnxExportError(f'torch.onnx.export failed for {type(model).__name__} at '
                                      f'opset {opset}: {error}') from error

        model_proto = onnx.load(tmp_export)
        num_plugin = count_plugin_nodes(model_proto)
        expected_plugin = num_msda if msda == 'trt-plugin' else 0
        if num_plugin != expected_plugin:
            raise OnnxExportError(f'expected {expected_plugin} {PLUGIN_DOMAIN} plugin node(s) '
                                  f'(msda={msda!r}, {num_msda} deformable attention(s)), the '
                                  f'graph has {num_plugin}')
        if msda == 'trt-plugin':
            strip_plugin_attributes(model_proto)
        allowed = (PLUGIN_DOMAIN, ) if msda == 'trt-plugin' else ()
        foreign = _foreign_nodes(model_proto, allowed)
        if foreign:
            raise OnnxExportError(f'the exported graph contains custom ops {foreign} that '
                                  'ONNX Runtime cannot run: a component of the model has no '
                                  'standard ONNX form')
        num_grid_sample = sum(n.op_type == 'GridSample' for n in model_proto.graph.node)
        if msda == 'grid_sample':
            levels = sum(m.num_levels for m in msda_modules(export_model))
            if num_grid_sample != levels:
                raise OnnxExportError(f'expected {levels} GridSample nodes (one per attention '
                                      f'and level), the graph has {num_grid_sample}')
        model_proto.producer_name = 'mmdet_detrx.deploy'
        onnx.checker.check_model(model_proto)
        onnx.save(model_proto, tmp_final)
        # mkstemp makes 0600; give the file the mode open() would have (0o666 & ~umask)
        os.chmod(tmp_final, 0o666 & ~current_umask())
        os.replace(tmp_final, out_file)
    finally:
        for path in (tmp_export, tmp_final):
            if osp.exists(path):
                os.remove(path)
        model.to(device).train(was_training)
    return OnnxExportSummary(
        out_file=out_file, opset=opset, msda=msda, dynamic=dynamic, input_shape=input_shape,
        num_msda_modules=num_msda, num_plugin_nodes=num_plugin if msda == 'trt-plugin' else 0,
        num_grid_sample_nodes=num_grid_sample, act_exact_layers=len(act_layers),
        num_nodes=len(model_proto.graph.node))

