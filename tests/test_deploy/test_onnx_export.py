"""ONNX export of DETR-family detectors: ONNX Runtime (CPU) gives PyTorch's detections.

Each case is one of our configs shrunk the same way (ResNet-18 / BoT50 with 16 base channels,
two encoder/decoder layers, 4 classes, a 64x80 image), so an export takes seconds. Every
parameter is perturbed (mmcv zero-initialises the deformable sampling offsets). The top-k of
the head keeps every candidate (``max_per_img`` = queries x classes) and the two-stage models
select every encoder token at the traced size, so a near-tie between two candidates cannot
change which detections exist; ``compare_detections`` then matches them one to one.
"""
import functools
import os
import os.path as osp
import warnings

import onnx
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmdet.registry import MODELS

from mmdet_detrx.deploy import (PLUGIN_DOMAIN, PLUGIN_OP_TYPE, OnnxExportError,
                                compare_detections, export_detector_onnx, msda_modules,
                                pytorch_detections, run_onnxruntime)

init_default_scope('mmdet')

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIGS = {
    'deformable-detr': 'configs/deformable_detr/deformable-detrx_r50_16xb2-50e_coco.py',
    'deformable-detr-two-stage':
    'configs/deformable_detr/deformable-detrx-refine-twostage_r50_16xb2-50e_coco.py',
    'dino': 'configs/dino/dinox-4scale_r50_8xb2-12e_coco.py',
    'detr': 'configs/detr/detr_r18-dc5_1xb8-3000i_synthetic-shapes.py',
    'act-detr': 'configs/act_detr_r50.py',
    'botnet-deformable-detr': 'configs/botnet/deformable-detrx_bot50_16xb2-50e_coco.py',
}
HEIGHT, WIDTH = 64, 80
SECOND_SIZE = (96, 72)
NUM_CLASSES = 4
BASE_CHANNELS = 16
# Encoder tokens of a 64x80 image on the 4 levels of stride 8..64: 8x10 + 4x5 + 2x3 + 1x2.
TOKENS_64x80 = 108


def _small_cfg(case):
    cfg = Config.fromfile(osp.join(REPO, CONFIGS[case])).model
    backbone = cfg.backbone
    if backbone.type == 'BoTNet':
        backbone.update(depth=50, base_channels=BASE_CHANNELS, init_cfg=None)
        widths = [BASE_CHANNELS * 4 * 2**i for i in range(4)]  # Bottleneck: expansion 4
    else:
        backbone.update(depth=18, base_channels=BASE_CHANNELS, init_cfg=None)
        widths = [BASE_CHANNELS * 2**i for i in range(4)]  # BasicBlock
    cfg.neck.in_channels = [widths[i] for i in backbone.out_indices]
    cfg.encoder.num_layers = 2
    cfg.decoder.num_layers = 2
    cfg.bbox_head.num_classes = NUM_CLASSES
    two_stage = cfg.get('as_two_stage', False) or cfg.type.startswith('DINO')
    cfg.num_queries = TOKENS_64x80 if two_stage else 20
    sigmoid = cfg.bbox_head.loss_cls.get('use_sigmoid', False)
    cfg.test_cfg = dict(max_per_img=cfg.num_queries * (NUM_CLASSES if sigmoid else 1))
    if 'dn_cfg' in cfg:
        cfg.dn_cfg.group_cfg.num_dn_queries = 10
    return cfg


@functools.lru_cache(maxsize=None)
def _model(case):
    torch.manual_seed(0)
    model = MODELS.build(_small_cfg(case))
    model.init_weights()  # e.g. level_embed is allocated uninitialised
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.02)
    return model.eval()


def _image(height=HEIGHT, width=WIDTH, seed=1):
    return torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _assert_parity(model, onnx_file, inputs):
    result = compare_detections(pytorch_detections(model, inputs),
                                run_onnxruntime(onnx_file, inputs))
    assert result.matched, str(result)
    assert result.num_detections > 0


# Deformable DETR and DINO (two-stage) are checked at the traced size by the dynamic-shape test.
@pytest.mark.parametrize('case', [
    'detr', 'botnet-deformable-detr',
    pytest.param('deformable-detr', marks=pytest.mark.slow),
    pytest.param('deformable-detr-two-stage', marks=pytest.mark.slow),
    pytest.param('dino', marks=pytest.mark.slow)])
def test_onnxruntime_matches_pytorch(case, tmp_path):
    model = _model(case)
    out = str(tmp_path / f'{case}.onnx')
    summary = export_detector_onnx(model, out, (1, 3, HEIGHT, WIDTH), msda='grid_sample')
    num_msda = len(msda_modules(model))
    assert summary.num_msda_modules == num_msda
    assert summary.num_grid_sample_nodes == sum(m.num_levels for m in msda_modules(model))
    graph = onnx.load(out)
    onnx.checker.check_model(graph)
    assert {o.name for o in graph.graph.output} == {'dets', 'labels'}
    assert all(n.domain in ('', 'ai.onnx') for n in graph.graph.node)
    _assert_parity(model, out, _image())
    assert sorted(os.listdir(tmp_path)) == [f'{case}.onnx']  # no temporary file left


def _check_dynamic_export(case, tmp_path):
    model = _model(case)
    out = str(tmp_path / 'dynamic.onnx')
    export_detector_onnx(model, out, (1, 3, HEIGHT, WIDTH), dynamic=True)
    dims = onnx.load(out).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == [1, 3, 'height', 'width']
    for size in ((HEIGHT, WIDTH), SECOND_SIZE):
        _assert_parity(model, out, _image(*size))
    # Boxes are scaled and clipped by the size given at run time, not the traced one.
    dets, _ = run_onnxruntime(out, _image(*SECOND_SIZE))
    assert dets[..., [0, 2]].max() <= SECOND_SIZE[1] and dets[..., [1, 3]].max() <= SECOND_SIZE[0]
    assert dets[..., [1, 3]].max() > HEIGHT  # some box reaches past the traced height


@pytest.mark.parametrize('case', ['deformable-detr', 'dino'])
def test_dynamic_shape_export_runs_at_two_sizes(case, tmp_path):
    _check_dynamic_export(case, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize('case', ['deformable-detr-two-stage', 'detr', 'botnet-deformable-detr',
                                  'act-detr'])
def test_dynamic_shape_export_runs_at_two_sizes_slow(case, tmp_path):
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='.*clustered attention does not export')
        _check_dynamic_export(case, tmp_path)


def test_act_detr_exports_exact_attention_with_a_warning(tmp_path):
    model = _model('act-detr')
    out = str(tmp_path / 'act.onnx')
    with pytest.warns(UserWarning, match='clustered attention does not export'):
        summary = export_detector_onnx(model, out, (1, 3, HEIGHT, WIDTH))
    assert summary.act_exact_layers == 2
    assert not any(m.use_exact for m in model.modules() if hasattr(m, 'use_exact'))  # restored
    _assert_parity(model, out, _image())  # pytorch_detections runs ACT in exact mode too


def test_trt_plugin_export_has_one_plugin_node_per_attention(tmp_path):
    model = _model('deformable-detr')
    out = str(tmp_path / 'trt.onnx')
    summary = export_detector_onnx(model, out, (1, 3, HEIGHT, WIDTH), msda='trt-plugin',
                                   dynamic=True)
    graph = onnx.load(out)
    onnx.checker.check_model(graph)
    plugins = [n for n in graph.graph.node if n.op_type == PLUGIN_OP_TYPE]
    assert len(plugins) == summary.num_plugin_nodes == 4  # 2 encoder + 2 decoder layers
    assert not any(n.op_type == 'GridSample' for n in graph.graph.node)
    assert {entry.domain for entry in graph.opset_import} >= {PLUGIN_DOMAIN}
    producers = {out_name: n for n in graph.graph.node for out_name in n.output}
    consumers = {}
    for node in graph.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in plugins:
        assert node.domain == PLUGIN_DOMAIN and len(node.input) == 5 and not node.attribute
        # spatial_shapes and level_start_index reach the plugin as int32, as it requires
        for index in (1, 2):
            cast = producers[node.input[index]]
            assert cast.op_type == 'Cast' and cast.attribute[0].i == onnx.TensorProto.INT32
        # (B, Q, heads, C) output reshaped back to (B, Q, heads * C)
        assert [n.op_type for n in consumers[node.output[0]]] == ['Reshape']


def _export_error(tmp_path, **kwargs):
    out = tmp_path / 'model.onnx'
    with pytest.raises(OnnxExportError) as info:
        export_detector_onnx(kwargs.pop('model', None) or _model('deformable-detr'), str(out),
                             (1, 3, HEIGHT, WIDTH), **kwargs)
    assert os.listdir(tmp_path) == []  # nothing written, no temporary file left
    return str(info.value)


def test_opset_too_old_for_grid_sample(tmp_path):
    message = _export_error(tmp_path, opset=15)
    assert 'opset 15' in message and 'GridSample' in message and '16' in message


def test_unsupported_detector_is_named(tmp_path):
    detector = MODELS.build(dict(
        type='RetinaNet',
        data_preprocessor=dict(type='DetDataPreprocessor'),
        backbone=dict(type='ResNet', depth=18, base_channels=8, out_indices=(3, )),
        neck=dict(type='ChannelMapper', in_channels=[64], out_channels=16, num_outs=1),
        bbox_head=dict(type='RetinaHead', num_classes=2, in_channels=16, feat_channels=16,
                       anchor_generator=dict(type='AnchorGenerator', octave_base_scale=4,
                                             scales_per_octave=1, ratios=[1.0],
                                             strides=[32]),
                       bbox_coder=dict(type='DeltaXYWHBBoxCoder'),
                       loss_cls=dict(type='FocalLoss', use_sigmoid=True),
                       loss_bbox=dict(type='L1Loss'))))
    message = _export_error(tmp_path, model=detector)
    assert 'RetinaNet is not supported' in message


def test_unsupported_component_is_named(tmp_path):
    cfg = _small_cfg('deformable-detr')
    cfg.backbone.update(depth=50, base_channels=8, dcn=dict(type='DCNv2', deform_groups=1),
                        stage_with_dcn=(False, False, False, True))
    cfg.neck.in_channels = [8 * 4 * 2**i for i in (1, 2, 3)]
    message = _export_error(tmp_path, model=MODELS.build(cfg))  # refused before any forward
    assert 'backbone.layer4' in message and 'ModulatedDeformConv2d' in message


def test_failed_export_leaves_no_file_and_keeps_an_existing_one(tmp_path, monkeypatch):
    out = tmp_path / 'model.onnx'
    out.write_bytes(b'previous export')

    def fail(*args, **kwargs):
        raise RuntimeError('exporter failed mid-way')

    monkeypatch.setattr(torch.onnx, 'export', fail)
    with pytest.raises(OnnxExportError, match='exporter failed mid-way'):
        export_detector_onnx(_model('deformable-detr'), str(out), (1, 3, HEIGHT, WIDTH))
    assert os.listdir(tmp_path) == ['model.onnx'] and out.read_bytes() == b'previous export'


def test_bad_arguments_are_named(tmp_path):
    assert 'msda must be one of' in _export_error(tmp_path, msda='cuda')
    assert 'opset must be an int in [11, 17]' in _export_error(tmp_path, opset=21)


@pytest.mark.parametrize('opset', [11, 17])
def test_documented_opset_range_exports(tmp_path, opset):
    """Issue 27.5: the documented range is the one that works (18-20 always failed inside the
    TorchScript exporter for the deformable detectors; they are refused up front now)."""
    msda = 'trt-plugin' if opset < 16 else 'grid_sample'
    summary = export_detector_onnx(_model('deformable-detr'), str(tmp_path / 'model.onnx'),
                                   (1, 3, HEIGHT, WIDTH), msda=msda, opset=opset)
    assert summary.opset == opset and os.listdir(tmp_path) == ['model.onnx']


def test_opsets_the_exporter_fails_on_are_refused_up_front(tmp_path):
    assert '18-20 hit an exporter assert' in _export_error(tmp_path, opset=18)


def test_onnx_file_honours_the_umask(tmp_path):
    """The file gets the mode open() would give it (mkstemp alone made it 0600)."""
    import stat
    old = os.umask(0o022)
    try:
        out = str(tmp_path / 'detr.onnx')
        export_detector_onnx(_model('detr'), out, (1, 3, HEIGHT, WIDTH), msda='grid_sample')
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o644


def test_stale_temporary_files_of_a_killed_export_are_cleaned(tmp_path):
    """Issue 27.5: a killed export left .export-*/.final-* files that nothing removed."""
    import socket
    import subprocess
    import sys
    from mmdet_detrx.deploy.onnx_export import _host
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                          stdout=subprocess.PIPE, text=True, check=True).stdout.strip()
    stale = [f'.detrx-export.{_host()}.{dead}.abc.onnx', f'.detrx-final.{_host()}.{dead}.x.onnx']
    kept = [f'.detrx-export.{_host()}.{os.getpid()}.live.onnx',  # a live process: not ours to touch
            f'.detrx-export.otherhost.{dead}.abc.onnx',  # another machine on a shared folder
            'notes.onnx']
    for name in stale + kept:
        (tmp_path / name).write_bytes(b'x')
    assert socket.gethostname()  # the names above carry this host
    export_detector_onnx(_model('deformable-detr'), str(tmp_path / 'model.onnx'),
                         (1, 3, HEIGHT, WIDTH))
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ['model.onnx'])
