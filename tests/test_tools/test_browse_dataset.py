import os.path as osp

import cv2
from _helpers import REPO_CONFIGS
from mmengine.config import Config

from mmdet_detrx.tools.analysis import browse_dataset

browse = browse_dataset.browse

DEMO = osp.join(REPO_CONFIGS, 'demo/deformable-detrx_r18_1xb8-1000i_synthetic-shapes.py')


def test_browse_embedded_dataset_writes_annotated_pngs(tmp_path):
    cfg = Config.fromfile(DEMO)
    spec = dict(seed=2, num_train=4, num_val=2, image_size=(96, 96), max_objects=3)
    for loader in ('train_dataloader', 'val_dataloader'):
        cfg[loader].dataset.data_root = str(tmp_path / 'shapes') + '/'
        cfg[loader].dataset.spec = spec
    written = browse(cfg, str(tmp_path / 'vis'), num=2)
    assert len(written) == 2
    for path in written:
        img = cv2.imread(path)
        # the pipeline resizes to the demo's 160x160 scale (keep ratio): 160 on the long side
        assert img is not None and max(img.shape[:2]) == 160
        assert img.std() > 0


def test_command_line_with_mmdets_flag_spelling(tmp_path):
    """``--output-dir`` (mmdet's name) still works next to the shared ``--out-dir``."""
    spec = dict(seed=3, num_train=2, num_val=1, image_size=(64, 64), max_objects=2)
    config = tmp_path / 'tiny_shapes.py'
    config.write_text(
        f'_base_ = {DEMO!r}\n'
        f'train_dataloader = dict(dataset=dict(data_root={str(tmp_path / "shapes") + "/"!r}, '
        f'spec={spec!r}))\n'
        f'val_dataloader = train_dataloader\n')
    tool = browse_dataset
    written = tool.main([str(config), '--output-dir', str(tmp_path / 'vis'), '--num', '1'])
    assert len(written) == 1 and cv2.imread(written[0]) is not None
