"""detrx-export (mmdet_detrx/tools/deployment/pytorch2onnx.py) as a user runs it: config + checkpoint -> verified ONNX file."""
import os
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmdet.registry import MODELS

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
BASE = osp.join(ROOT, 'configs', 'deformable_detr', 'deformable-detrx_r50_16xb2-50e_coco.py')
# A tiny Deformable DETR: every candidate kept by the top-k (10 queries x 4 classes).
TINY = f"""_base_ = {BASE!r}
model = dict(
    backbone=dict(depth=18, base_channels=16, init_cfg=None),
    neck=dict(in_channels=[32, 64, 128]),
    encoder=dict(num_layers=1), decoder=dict(num_layers=1), num_queries=10,
    bbox_head=dict(num_classes=4), test_cfg=dict(max_per_img=40))
"""


def _load_tool():
    from mmdet_detrx.tools.deployment import pytorch2onnx
    return pytorch2onnx


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp('tiny')
    config = folder / 'tiny_deformable_detr.py'
    config.write_text(TINY)
    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(str(config)).model)
    model.init_weights()  # e.g. level_embed is allocated uninitialised
    with torch.no_grad():  # mmcv zero-initialises the sampling offsets: make them matter
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    checkpoint = folder / 'tiny.pth'
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, checkpoint)
    return str(config), str(checkpoint), model.state_dict()


def test_exports_a_dynamic_model_and_verifies_it_at_two_sizes(tiny, tmp_path, capsys):
    config, checkpoint, _ = tiny
    out = tmp_path / 'tiny.onnx'
    rc = _load_tool().main([config, checkpoint, '--out', str(out), '--shape', '64', '80',
                            '--dynamic', '--verify'])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert out.is_file() and 'GridSample' in printed
    verified = [line for line in printed.splitlines() if line.startswith('verify')]
    assert len(verified) == 2 and all(': match:' in line for line in verified), printed


@pytest.mark.slow  # the library's TRT export is tested in test_onnx_export.py
def test_trt_plugin_export(tiny, tmp_path, capsys):
    config, checkpoint, _ = tiny
    out = tmp_path / 'tiny_trt.onnx'
    rc = _load_tool().main([config, checkpoint, '--out', str(out), '--shape', '64', '80',
                            '--msda', 'trt-plugin'])
    assert rc == 0 and out.is_file()
    assert '2 MultiscaleDeformableAttnPlugin_TRT nodes' in capsys.readouterr().out


def test_checkpoint_that_does_not_match_is_refused(tiny, tmp_path, capsys):
    config, _, state_dict = tiny
    state_dict = dict(state_dict)
    missing = 'decoder.layers.0.cross_attn.sampling_offsets.weight'
    del state_dict[missing]
    checkpoint = tmp_path / 'bad.pth'
    torch.save({'state_dict': state_dict}, checkpoint)
    out = tmp_path / 'bad.onnx'
    rc = _load_tool().main([config, str(checkpoint), '--out', str(out), '--shape', '64', '80'])
    error = capsys.readouterr().err
    assert rc == 1
    assert 'does not match' in error and missing in error
    assert sorted(os.listdir(tmp_path)) == ['bad.pth']


def test_opset_too_old_for_grid_sample_is_refused(tiny, tmp_path, capsys):
    config, checkpoint, _ = tiny
    rc = _load_tool().main([config, checkpoint, '--out', str(tmp_path / 'm.onnx'), '--shape',
                            '64', '80', '--opset', '15'])
    assert rc == 1
    assert 'opset 15 is too old' in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
