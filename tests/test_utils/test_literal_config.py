"""A checkpoint's stored config is read as data: mmengine's BaseInferencer (mmdet's
``DetInferencer(weights=ckpt)``) would run it with ``Config.fromstring``."""
import os.path as osp

import pytest
import torch
from mmengine.config import Config

import mmdet_detrx  # noqa: F401  (installs the inferencer patch)
from mmdet_detrx.utils import UnsafeCheckpointError
from mmdet_detrx.utils.literal_config import ConfigNotLiteralError, literal_config

CONFIGS = osp.join(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))), 'configs')


@pytest.mark.parametrize('name', [
    'demo/deformable-detrx_r18_1xb8-1000i_synthetic-shapes.py',
    'dino/dinox-4scale_r50_8xb2-12e_coco.py', 'act_detr_r50_mtkd.py'])
def test_dumped_config_reads_as_mmengine_reads_it(name):
    text = Config.fromfile(osp.join(CONFIGS, name)).pretty_text
    assert Config(literal_config(text)).to_dict() == \
        Config.fromstring(text, file_format='.py').to_dict()


@pytest.mark.parametrize('text, refused', [
    ("import os\nos.system('touch pwned')\n", 'Import'),
    ("model = __import__('os').system('touch pwned')\n", 'line 1: Call'),
    ('model = dict(**other)\n', 'line 1: Call'),
    ('model = [i for i in range(3)]\n', 'ListComp'),
    ("model = open('x').read()\n", 'Call'),
    ('model.type = 1\n', 'assignments'),
    ('a = b = 1\n', 'assignments'),
    ('x = other\n', 'Name'),
    ('x = {[1]: 2}\n', 'unhashable'),
    ('x = ' + '[' * 5000 + ']' * 5000 + '\n', 'not Python'),
    ('x = (', 'not Python'),
])
def test_anything_but_data_is_refused_naming_the_line(text, refused):
    with pytest.raises(ConfigNotLiteralError, match=refused):
        literal_config(text)


def test_literals_keep_their_types():
    assert literal_config("a = dict(b=(1, -2.5), c=[None, True], d={'e': {3}})\nf = -1\n") == \
        dict(a=dict(b=(1, -2.5), c=[None, True], d={'e': {3}}), f=-1)


def test_det_inferencer_never_runs_a_checkpoints_config(tmp_path, monkeypatch):
    from mmdet.apis import DetInferencer
    monkeypatch.delenv('MMDET_DETRX_TRUSTED_CHECKPOINTS', raising=False)
    marker = tmp_path / 'pwned'
    payload = f'import os\nopen({str(marker)!r}, "w").close()\nmodel = dict(type="DETR")\n'
    for stored in (dict(meta=dict(cfg=payload)),
                   dict(message_hub=dict(runtime_info=dict(cfg=payload)))):
        checkpoint = tmp_path / 'crafted.pth'
        torch.save(dict(state_dict={}, **stored), checkpoint)
        with pytest.raises(UnsafeCheckpointError, match='not plain data.*DetInferencer'):
            DetInferencer(weights=str(checkpoint), device='cpu')
        assert not marker.exists()

    torch.save(dict(state_dict={}), checkpoint)
    with pytest.raises(ValueError, match='holds no config'):
        DetInferencer(weights=str(checkpoint), device='cpu')
