"""visualize_deform_points (mmdet_detrx/tools/analysis/) on a tiny random Deformable DETR."""
import os.path as osp

import cv2
import numpy as np
import pytest
import torch
from _helpers import REPO_CONFIGS
from _helpers.detectors import shrink_deformable_detr
from mmdet.registry import MODELS
from mmengine.config import Config
from mmengine.registry import init_default_scope

from mmdet_detrx.datasets import SHAPE_CLASSES, generate_synthetic_shapes
from mmdet_detrx.tools.analysis import visualize_deform_points as tool

init_default_scope('mmdet')  # configs name mmdet's modules without a scope prefix

CONFIG = osp.join(REPO_CONFIGS, 'deformable_detr', 'deformable-detrx_r50_16xb2-50e_coco.py')
NUM_QUERIES = 20


@pytest.fixture(scope='module')
def tiny_model(tmp_path_factory):
    """(config path, checkpoint path, image path): random weights, ResNet-18, one layer each."""
    root = tmp_path_factory.mktemp('deform_points')
    cfg = Config.fromfile(CONFIG)
    shrink_deformable_detr(cfg.model, num_layers=1, num_queries=NUM_QUERIES)
    cfg.model.bbox_head.num_classes = len(SHAPE_CLASSES)
    cfg.model.test_cfg.max_per_img = 10  # at most NUM_QUERIES * classes
    cfg.test_dataloader.dataset.pipeline[1].scale = (160, 160)  # Resize; keeps the test quick
    config_path = str(root / 'tiny_deformable_detrx.py')
    cfg.dump(config_path)

    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    with torch.no_grad():  # let the sampling offsets depend on the query
        for attn in model.modules():
            if hasattr(attn, 'sampling_offsets'):
                attn.sampling_offsets.weight.normal_(0, 0.02)
                attn.attention_weights.weight.normal_(0, 0.05)
    checkpoint_path = str(root / 'tiny.pth')
    torch.save(dict(state_dict=model.state_dict(),
                    meta=dict(dataset_meta=dict(classes=SHAPE_CLASSES))), checkpoint_path)

    data_root = root / 'shapes'
    generate_synthetic_shapes(str(data_root), num_train=1, num_val=1, image_size=(96, 128))
    image_path = str(data_root / 'val' / '000000.png')
    return config_path, checkpoint_path, image_path


def test_writes_one_panel_per_top_query(tiny_model, tmp_path):
    config, checkpoint, image = tiny_model
    written = tool.main([config, checkpoint, image, '--out-dir', str(tmp_path), '--queries', '3',
                         '--score-thr', '0', '--panel-size', '200'])
    assert written == [str(tmp_path / '000000_deform_points.png')]
    png = cv2.imread(written[0])
    h, w = cv2.imread(image).shape[:2]
    scale = 200 / max(h, w)
    assert png.shape[:2] == (round(h * scale), 3 * round(w * scale))  # three panels in a row
    assert png.std() > 0


def test_given_query_ids_and_folder_input(tiny_model, tmp_path):
    config, checkpoint, image = tiny_model
    model = tool.init_detector(config, checkpoint, device='cpu')
    drawn = tool.visualize_image(model, image, str(tmp_path / 'a.png'), query_ids=[0, 7, 19],
                                 panel_size=120)
    assert drawn == [0, 7, 19]
    assert osp.getsize(tmp_path / 'a.png') > 0
    with pytest.raises(ValueError, match='query-ids'):
        tool.visualize_image(model, image, str(tmp_path / 'b.png'), query_ids=[NUM_QUERIES])
    assert tool.list_images(osp.dirname(image))[0] == image


def test_recorder_captures_last_decoder_layer(tiny_model):
    config, checkpoint, image = tiny_model
    model = tool.init_detector(config, checkpoint, device='cpu')
    recorder = tool.SamplingRecorder(model)
    tool.inference_detector(model, image)
    recorder.remove()
    attn = model.decoder.layers[-1].cross_attn
    locations = recorder.records['sampling_locations']
    weights = recorder.records['attention_weights']
    assert locations.shape == (1, NUM_QUERIES, attn.num_heads, attn.num_levels, attn.num_points, 2)
    torch.testing.assert_close(weights.sum((-1, -2)), torch.ones(1, NUM_QUERIES, attn.num_heads))
    assert recorder.records['cls_scores'].shape == (1, NUM_QUERIES, len(SHAPE_CLASSES))
    assert not attn._forward_pre_hooks  # removed again
    # With query-dependent offsets the points spread around the reference points.
    assert np.ptp(locations[..., 0].numpy()) > 0


def test_nothing_drawn_is_an_error_naming_the_threshold(tiny_model, tmp_path, capsys):
    """An early checkpoint scores below the default threshold: a non-zero exit, not a silent 0."""
    config, checkpoint, image = tiny_model
    out_dir = tmp_path / 'none'
    with pytest.raises(SystemExit) as exc:
        tool.main([config, checkpoint, image, '--out-dir', str(out_dir), '--score-thr', '1.01'])
    assert exc.value.code not in (None, 0)  # a message: the interpreter exits with status 1
    assert '--score-thr' in str(exc.value.code) and '--query-ids' in str(exc.value.code)
    assert 'best' in capsys.readouterr().err  # the per-image note says what would pass
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_images_differing_only_in_extension_get_their_own_pictures(tiny_model, tmp_path):
    """Issue 27.4: a.png and a.jpg used to write the same a_deform_points.png."""
    from PIL import Image
    config, checkpoint, image = tiny_model
    folder = tmp_path / 'images'
    folder.mkdir()
    Image.open(image).convert('RGB').save(folder / 'a.png')
    Image.open(image).convert('RGB').save(folder / 'a.jpg')
    written = tool.main([config, checkpoint, str(folder), '--out-dir', str(tmp_path / 'out'),
                         '--queries', '1', '--score-thr', '0', '--panel-size', '64'])
    assert sorted(osp.basename(p) for p in written) == ['a_jpg_deform_points.png',
                                                         'a_png_deform_points.png']
    assert all(osp.getsize(p) > 0 for p in written)


def test_output_names_never_clash():
    from mmdet_detrx.utils.image_files import output_names
    names = output_names(['x/a.png', 'x/a.jpg', 'y/a.png', 'b.png', 'B.jpg', 'c.png'], '_v')
    assert names == ['a_png_v.png', 'a_jpg_v.png', 'a_png_1_v.png', 'b_png_v.png', 'B_jpg_v.png',
                     'c_v.png']
    assert len({n.lower() for n in names}) == len(names)
