"""What the converters refuse, and that a refusal leaves nothing behind; reading HF folders
without transformers."""
import json
import os
import sys

import pytest
import torch
from _helpers.hf_detrs import build_hf, save_hf

from mmdet_detrx.converters import (ConversionError, convert, convert_source, detect_layout,
                                    load_source, write_safetensors)
from mmdet_detrx.converters import _hf_common


@pytest.fixture(scope='module')
def detr_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp('hf') / 'detr'
    return save_hf(build_hf('detr', encoder_layers=1, decoder_layers=1), str(folder))


def fake_hf_folder(path, config, tensors=None):
    path.mkdir(parents=True)
    (path / 'config.json').write_text(json.dumps(config))
    (path / 'model.safetensors').write_bytes(
        write_safetensors(tensors or {'model.x.weight': torch.zeros(2)}))
    return str(path)


def assert_refused(src, out_dir, match, **kwargs):
    with pytest.raises(ConversionError, match=match):
        convert(src, str(out_dir), **kwargs)
    assert not os.path.exists(out_dir), os.listdir(out_dir)


def test_unsupported_architecture_is_named(tmp_path):
    folder = fake_hf_folder(tmp_path / 'rt', dict(model_type='rt_detr',
                                                  architectures=['RTDetrForObjectDetection']))
    assert_refused(folder, tmp_path / 'out', r"model_type='rt_detr'.*RTDetrForObjectDetection")
    folder = fake_hf_folder(tmp_path / 'seg', dict(model_type='detr',
                                                   architectures=['DetrForSegmentation']))
    assert_refused(folder, tmp_path / 'out', 'unsupported HF architecture DetrForSegmentation')


def test_unsupported_option_is_named(tmp_path):
    hf = build_hf('detr', encoder_layers=1, decoder_layers=1, position_embedding_type='learned')
    folder = save_hf(hf, str(tmp_path / 'learned'))
    assert_refused(folder, tmp_path / 'out', "position_embedding_type='learned'")


def test_unknown_keys_name_the_closest_layout_and_the_keys(tmp_path, detr_folder):
    state_dict = dict(load_source(detr_folder).state_dict)
    state_dict['model.encoder.layers.0.my_adapter.weight'] = torch.zeros(3)
    path = tmp_path / 'odd.safetensors'
    path.write_bytes(write_safetensors(state_dict))
    assert_refused(str(path), tmp_path / 'out',
                   r"Closest: 'hf-detr'.*model\.encoder\.layers\.0\.my_adapter\.weight")
    # a named layout that does not fit says why, too
    assert_refused(detr_folder, tmp_path / 'out', "not in layout 'hf-deformable-detr'",
                   layout='hf-deformable-detr')
    assert_refused(detr_folder, tmp_path / 'out', "unknown layout 'hf-dter'.*hf-detr",
                   layout='hf-dter')


def test_class_count_mismatch(tmp_path, detr_folder):
    # config.json's labels against the classifier
    import shutil
    folder = tmp_path / 'three'
    shutil.copytree(detr_folder, folder)
    config = json.loads((folder / 'config.json').read_text())
    config['id2label'] = {str(i): f'c{i}' for i in range(3)}
    (folder / 'config.json').write_text(json.dumps(config))
    assert_refused(str(folder), tmp_path / 'out', 'class-count mismatch.*3 classes.*5')
    # a given config against the checkpoint
    good, _ = convert(detr_folder, str(tmp_path / 'good'))
    other = tmp_path / 'other.py'
    other.write_text(f'_base_ = {good!r}\nmodel = dict(bbox_head=dict(num_classes=7))\n')
    assert_refused(detr_folder, tmp_path / 'out', r'class-count mismatch.*5 classes.*=7',
                   config=str(other))


def test_a_failed_strict_load_leaves_nothing(tmp_path, detr_folder, monkeypatch):
    from mmdet_detrx.converters import hf_detr
    real = hf_detr.convert_hf_detr

    def lossy(source, conditional):
        converted = real(source, conditional)
        converted.state_dict.pop('decoder.post_norm.weight')
        return converted

    monkeypatch.setattr(hf_detr, 'convert_hf_detr', lossy)
    existing = tmp_path / 'existing'
    existing.mkdir()
    (existing / 'keep.txt').write_text('mine')
    with pytest.raises(ConversionError, match=r'1 missing: decoder\.post_norm\.weight'):
        convert(detr_folder, str(existing))
    assert os.listdir(existing) == ['keep.txt']  # no staging folder, no partial output


def test_without_transformers(tmp_path, detr_folder, monkeypatch):
    """The built-in hub key table reads the folder to the same weights as transformers does,
    and the export, which needs transformers, says what to install."""
    source = load_source(detr_folder)
    with_transformers = detect_layout(source).convert(source)
    monkeypatch.setitem(sys.modules, 'transformers', None)  # import transformers fails
    assert not _hf_common.transformers_available()
    without = detect_layout(source).convert(source)
    assert 'built-in hub key table' in without.notes[0]
    assert without.state_dict.keys() == with_transformers.state_dict.keys()
    for key, value in with_transformers.state_dict.items():
        assert torch.equal(value, without.state_dict[key]), key
    assert without.model == with_transformers.model
    config_path, checkpoint_path = convert(detr_folder, str(tmp_path / 'out'))
    from mmdet_detrx.converters.hf_export import to_hf
    with pytest.raises(ConversionError, match=r'pip install transformers==5\.23\.0'):
        to_hf(config_path, checkpoint_path, str(tmp_path / 'hf'))
    assert not (tmp_path / 'hf').exists()
