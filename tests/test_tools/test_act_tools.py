"""ACT's analysis tools run end to end on a model built here and the embedded dataset."""
import importlib.util
import os
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from PIL import Image

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
ACT_CFG = osp.join(ROOT, 'configs/act/act-detr_r18-dc5_1xb8-3000i_synthetic-shapes.py')
DETR_CFG = osp.join(ROOT, 'configs/detr/detr_r18-dc5_1xb8-3000i_synthetic-shapes.py')


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, osp.join(ROOT, 'tools/analysis',
                                                                 f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def data_options(data_root):
    spec = dict(seed=2, num_train=4, num_val=3, image_size='(96,96)', max_objects=3)
    opts = []
    for split in ('val', 'test'):
        opts += [f'{split}_dataloader.dataset.data_root={data_root}',
                 *(f'{split}_dataloader.dataset.spec.{k}={v}' for k, v in spec.items()),
                 f'{split}_dataloader.batch_size=2', f'{split}_dataloader.num_workers=0',
                 f'{split}_dataloader.persistent_workers=False',
                 f'{split}_evaluator.ann_file={data_root}/annotations/val.json']
    return ['--cfg-options', *opts]


@pytest.fixture(scope='module')
def detr_checkpoint(tmp_path_factory):
    """A randomly initialised plain DETR (no ACT) and the embedded val set it is scored on."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    from mmdet_detrx.datasets import generate_synthetic_shapes
    register_all_modules()
    tmp = tmp_path_factory.mktemp('act_tools')
    data_root = str(tmp / 'shapes')
    generate_synthetic_shapes(data_root, seed=2, num_train=4, num_val=3, image_size=(96, 96),
                              max_objects=3)
    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(DETR_CFG).model)
    ckpt = str(tmp / 'detr.pth')
    torch.save(dict(state_dict=model.state_dict(), meta={}), ckpt)
    return ckpt, data_root, tmp


def test_benchmark_act(tmp_path):
    rows = load_tool('benchmark_act').main(
        ['--tokens', '128', '512', '--embed-dims', '32', '--heads', '4', '--repeat', '1',
         '--out-dir', str(tmp_path)])
    assert [r['tokens'] for r in rows] == [128, 512]
    assert all(0 < r['clusters'] < r['tokens'] for r in rows)
    assert all(0 <= r['rel_err'] < 0.5 for r in rows)
    for name in ('benchmark_act.csv', 'benchmark_act.md', 'benchmark_act.png'):
        assert osp.getsize(tmp_path / name) > 0
    assert Image.open(tmp_path / 'benchmark_act.png').size == (600, 400)


def test_get_flops_counts_actual_clusters(detr_checkpoint, tmp_path):
    ckpt, data_root, _ = detr_checkpoint
    report = load_tool('get_flops').main(
        [ACT_CFG, ckpt, '--num-images', '2', '--out-json', str(tmp_path / 'flops.json'),
         *data_options(data_root)])
    assert report['num_images'] == 2 and len(report['layers']) == 3
    embed_dims = 128
    for layer in report['layers']:
        n = layer['tokens']
        assert 1 <= layer['clusters'] <= n
        exact = (4 * n * embed_dims**2 + 2 * n * n * embed_dims) / 1e9
        assert layer['exact_gflops'] == pytest.approx(exact, rel=1e-6)
    enc, total = report['encoder_attention_gflops'], report['total_gflops']
    assert total['exact'] > enc['exact'] > 0
    assert total['exact'] - enc['exact'] == pytest.approx(total['act'] - enc['act'])
    assert osp.getsize(tmp_path / 'flops.json') > 0


def test_act_tradeoff_sweep(detr_checkpoint, tmp_path):
    ckpt, data_root, _ = detr_checkpoint
    rows = load_tool('act_tradeoff').main(
        [ACT_CFG, ckpt, '--num-hashes', '2', '8', '--out-dir', str(tmp_path),
         *data_options(data_root)])
    assert [r['attention'] for r in rows] == ['exact', 'ACT L=2', 'ACT L=8']
    exact, coarse, fine = rows
    assert exact['clusters'] != exact['clusters']  # nan: no clusters in exact mode
    assert coarse['clusters'] <= fine['clusters']  # more rounds split more
    assert all(r['AP'] >= 0 and r['encoder_gflops'] > 0 for r in rows)
    for name in ('act_tradeoff.md', 'act_tradeoff.csv', 'act_tradeoff.png'):
        assert osp.getsize(tmp_path / name) > 0
    assert Image.open(tmp_path / 'act_tradeoff.png').size == (1000, 400)


def test_visualize_act_clusters(detr_checkpoint, tmp_path):
    ckpt, data_root, _ = detr_checkpoint
    tool = load_tool('visualize_act_clusters')
    image = osp.join(data_root, 'val', sorted(os.listdir(osp.join(data_root, 'val')))[0])
    written = tool.main([ACT_CFG, ckpt, image, '--out-dir', str(tmp_path), '--head', '3',
                         '--panel-size', '120'])
    assert written == [str(tmp_path / (osp.splitext(osp.basename(image))[0] +
                                       '_act_clusters.png'))]
    png = Image.open(written[0])
    # The network input is the image resized so its longer side is 160 (the config's scale).
    w, h = Image.open(image).size
    scale = 160 / max(w, h)
    height, width = tool.figure_shape((round(h * scale), round(w * scale)), 3, 120)
    assert png.size == (width, height)
    pixels = torch.tensor(list(png.convert('RGB').getdata()), dtype=torch.float)
    assert pixels.std() > 10  # not blank
    with pytest.raises(ValueError, match='head'):
        tool.main([ACT_CFG, ckpt, image, '--out-dir', str(tmp_path), '--head', '8'])
