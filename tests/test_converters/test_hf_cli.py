"""The converter's command line (``tools/model_converters/convert.py`` =
``python -m mmdet_detrx.tools.model_converters.convert`` = ``detrx-convert``)."""
import os

import pytest
from _helpers.hf_detrs import build_hf, save_hf

from mmdet_detrx.converters import convert_source
from mmdet_detrx.tools.model_converters.convert import main


@pytest.fixture(scope='module')
def detr_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp('hf') / 'detr'
    return save_hf(build_hf('detr', encoder_layers=1, decoder_layers=1), str(folder))


def test_command_line(tmp_path, detr_folder, capsys):
    assert main([detr_folder, str(tmp_path / 'out')]) == 0
    printed = capsys.readouterr().out
    result = convert_source(detr_folder, str(tmp_path / 'again'))
    assert 'layout:     hf-detr (5 classes)' in printed
    assert f"config:     {tmp_path / 'out' / os.path.basename(result.config_path)}" in printed
    assert 'python tools/test.py' in printed and 'python tools/train.py' in printed
    assert main(['--list']) == 0
    assert 'hf-deformable-detr' in capsys.readouterr().out
    assert main([detr_folder, str(tmp_path / 'bad'), '--from', 'hf-conditional-detr']) == 1
    assert "not in layout 'hf-conditional-detr'" in capsys.readouterr().err
    assert not (tmp_path / 'bad').exists()
