"""FLOPs of a detector with our deformable attention: our get_flops (mmdet_detrx/tools/analysis/) works on
any detector (no ACT needed) and counts the op, and mmdet's own analysis_tools/get_flops.py
counts it too (the handle `import mmdet_detrx` registers in mmengine's analyzer)."""
import json
import os
import os.path as osp
import re
import subprocess
import sys

import mmdet
import pytest

from mmdet_detrx.ops import native_available

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DEMO = osp.join(ROOT, 'configs/demo/deformable-detrx_r18_1xb8-1000i_synthetic-shapes.py')
MMDET_GET_FLOPS = osp.join(osp.dirname(mmdet.__file__), '.mim', 'tools', 'analysis_tools',
                           'get_flops.py')
IMAGE = 96  # square images; ResNet strides 8/16/32 -> levels of 12, 6 and 3

pytestmark = pytest.mark.skipif(not native_available(), reason='native extension not built')


def load_tool():
    from mmdet_detrx.tools.analysis import get_flops
    return get_flops


def data_options(data_root):
    spec = dict(seed=3, num_train=2, num_val=2, image_size=f'({IMAGE},{IMAGE})', max_objects=2)
    opts = []
    for split in ('val', 'test'):
        opts += [f'{split}_dataloader.dataset.data_root={data_root}',
                 *(f'{split}_dataloader.dataset.spec.{k}={v}' for k, v in spec.items()),
                 f'{split}_dataloader.num_workers=0',
                 f'{split}_dataloader.persistent_workers=False',
                 f'{split}_evaluator.ann_file={data_root}/annotations/val.json']
    # The images vary in size (75-100% of image_size): resize every one to exactly IMAGE.
    opts += [f'val_dataloader.dataset.pipeline.1.scale=({IMAGE},{IMAGE})',
             'val_dataloader.dataset.pipeline.1.keep_ratio=False']
    return opts


def expected_msda_flops():
    """5 MACs per (query, head, level, point, channel): encoder queries = tokens, decoder 50."""
    heads, levels, points, channels = 8, 3, 4, 128 // 8
    tokens = sum((IMAGE // stride)**2 for stride in (8, 16, 32))
    per_query = 5 * heads * levels * points * channels
    return 3 * tokens * per_query + 3 * 50 * per_query


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp('shapes') / 'synthetic_shapes')


@pytest.fixture(scope='module')
def our_run(data_root, tmp_path_factory):
    """(report, out_dir) of our tool on two images of the demo config."""
    out_dir = tmp_path_factory.mktemp('flops')
    return load_tool().main([DEMO, '--num-images', '2', '--out-dir', str(out_dir), '--out-json',
                             str(out_dir / 'old_flag.json'), '--cfg-options',
                             *data_options(data_root)]), out_dir


@pytest.fixture(scope='module')
def our_report(our_run):
    return our_run[0]


def test_report_files(our_run):
    report, out_dir = our_run
    for name in ('flops.json', 'old_flag.json'):
        with open(out_dir / name) as f:
            assert json.load(f) == json.loads(json.dumps(report))
    table = (out_dir / 'flops.md').read_text()
    assert '| operator | GFLOPs |' in table and '| ms_deform_attn |' in table


def test_ours_counts_deformable_attention_without_act(our_report):
    assert our_report['num_images'] == 2 and our_report['layers'] == []
    assert our_report['operator_gflops']['ms_deform_attn'] * 1e9 == pytest.approx(
        expected_msda_flops())
    assert not any('detrx' in op for op in our_report['unsupported_ops'])
    total = our_report['total_gflops']
    assert total['exact'] == total['act'] == pytest.approx(
        sum(our_report['operator_gflops'].values()))
    assert our_report['params_m'] > 10  # ResNet-18 alone has 11 M


def test_mmdet_get_flops_counts_deformable_attention(our_report, data_root):
    env = dict(os.environ, OMP_NUM_THREADS='2')
    proc = subprocess.run([sys.executable, MMDET_GET_FLOPS, DEMO, '--num-images', '1',
                           '--cfg-options', *data_options(data_root)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert 'detrx::ms_deform_attn_forward' not in proc.stdout  # not "Unsupported operator ..."
    assert f'Input shape: ({IMAGE}, {IMAGE})' in proc.stdout
    flops = re.search(r'Flops: ([\d.]+)G', proc.stdout)
    assert flops, proc.stdout[-2000:]
    # Same analyzer, same input: equal to ours to mmdet's print precision (1 MFLOP), which is far
    # finer than the op's share (~7 MFLOPs here) that an uncounted op would lose.
    ours = our_report['total_gflops']['exact']
    assert abs(float(flops.group(1)) - ours) <= 0.0011
    assert expected_msda_flops() / 1e9 > 0.005
