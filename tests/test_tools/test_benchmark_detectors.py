"""benchmark_detectors and the tools' shared helper, mmdet_detrx/tools/common.py."""
import argparse
import csv
import os
import os.path as osp
import subprocess
import sys

import cv2
import pytest
import torch

from mmdet_detrx.tools import common as _common

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def load_tool():
    from mmdet_detrx.tools.analysis import benchmark_detectors
    return benchmark_detectors


# ------------------------------------------------------------------------------------- _common
def test_time_calls_interleaves_and_reports_each_callable():
    calls = []
    timings = _common.time_calls({'a': lambda: calls.append('a') or 1,
                                  'b': lambda: calls.append('b') or 2},
                                 repeats=3, warmup=1,
                                 setup=lambda name: calls.append(f'setup {name}'))
    # warm-up of each, then one timed run of each per repeat, setup outside the clock
    assert calls[:2] == ['a', 'b']
    assert calls[2:] == ['setup a', 'a', 'setup b', 'b'] * 3
    assert [len(timings[n].times) for n in 'ab'] == [3, 3]
    assert timings['b'].output == 2 and timings['a'].median >= 0
    with pytest.raises(ValueError, match='repeats'):
        _common.time_call(lambda: None, repeats=0)
    with pytest.raises(ValueError, match='clock'):
        _common.time_call(lambda: None, clock='gpu')


def test_tables_and_csv(tmp_path):
    rows = [dict(name='x', ms=1.234), dict(name='y', ms=None, extra=3)]
    table = _common.markdown_table(rows, [_common.Column('name', align='left'),
                                          _common.Column('ms', 'time (ms)', '{:.1f}')])
    assert table.splitlines() == ['| name | time (ms) |', '|---|---:|', '| x | 1.2 |',
                                  '| y | - |']
    path = _common.write_csv(rows, str(tmp_path / 'sub' / 'rows.csv'))
    with open(path) as f:
        read = list(csv.DictReader(f))
    assert read[0] == dict(name='x', ms='1.234', extra='') and read[1]['extra'] == '3'


def test_bar_chart_is_linear_with_ratio_labels():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    values = {('m', 'stock'): 3.0, ('m', 'ours'): 1.0, ('n', 'stock'): 2.0, ('n', 'ours'): 4.0}
    _common.bar_chart(ax, ['m', 'n'], ['stock', 'ours'], values, baseline='stock')
    labels = sorted(t.get_text() for t in ax.texts)
    assert ax.get_yscale() == 'linear'
    assert labels == sorted(['3', '2', '3.00x', '0.50x'])
    ax.cla()
    _common.bar_chart(ax, ['m'], ['stock', 'ours'], values, baseline='stock', ratio='relative')
    assert '0.33x' in [t.get_text() for t in ax.texts]
    plt.close(fig)


def test_panels_and_common_args():
    assert _common.panel_grid(5, max_cols=4) == (2, 4)
    assert _common.panel_grid(2, max_cols=4) == (1, 2)
    assert _common.panel_shape((600, 800), 400) == (300, 400)
    parser = argparse.ArgumentParser()
    _common.add_common_args(parser, 'repeats', 'out_dir', 'threads', 'dtypes', repeats=5)
    args = parser.parse_args(['--repeat', '2', '--threads', '1', '2', '--dtype', 'bfloat16'])
    assert (args.repeats, args.threads, args.dtypes, args.out_dir) == (2, [1, 2], ['bfloat16'],
                                                                      None)
    assert parser.parse_args([]).repeats == 5
    with pytest.raises(SystemExit):
        parser.parse_args(['--repeats', '0'])
    with pytest.raises(ValueError, match='unknown common argument'):
        _common.add_common_args(argparse.ArgumentParser(), 'colour')
    assert _common.parse_hw('800x1333') == (800, 1333)
    with pytest.raises(argparse.ArgumentTypeError, match='HxW'):
        _common.parse_hw('800')
    assert 'torch' in _common.machine_line()
    assert '(default 5)' in parser.format_help()  # an overridden default is the one shown


def test_removing_unhooks_the_model_even_when_inference_fails():
    model = torch.nn.Linear(2, 2)

    class Recorder:
        def __init__(self):
            self.handle = model.register_forward_hook(lambda *_: None)

        def remove(self):
            self.handle.remove()

    with pytest.raises(RuntimeError):
        with _common.removing(Recorder()) as recorder:
            assert len(model._forward_hooks) == 1 and isinstance(recorder, Recorder)
            raise RuntimeError('inference failed')
    assert not model._forward_hooks


# ------------------------------------------------------------------------- benchmark_detectors
def test_memory_extrapolation_recovers_quadratic_growth():
    tool = load_tool()

    def growth(pixels):
        return 5e7 + 30.0 * pixels + 1e-3 * pixels**2

    probes = [(p, growth(p)) for p in (1e4, 4e4, 1.6e5)]
    assert tool.extrapolate_peak(probes, 1e6) == pytest.approx(growth(1e6), rel=1e-6)
    # a noisy (negative) curvature falls back to a line through the two largest probes
    noisy = [(1e4, 1e6), (4e4, 5e6), (1.6e5, 1.1e7)]
    assert tool.extrapolate_peak(noisy, 3.2e5) == pytest.approx(1.1e7 + 6e6 / 1.2e5 * 1.6e5)


def test_benchmark_detectors_tiny_shape_end_to_end(tmp_path):
    out = tmp_path / 'bench'
    proc = subprocess.run(
        [sys.executable, 'tools/analysis/benchmark_detectors.py', '--models', 'deformable-detr',
         '--modes', 'infer', 'train', '--dtypes', 'float32', 'bfloat16', '--shape', '64', '96',
         '--repeats', '1', '--warmup', '1', '--threads', '1', '--with-nchw',
         '--out-dir', str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'GFLOP/s fp32' in proc.stdout and 'GB/s' in proc.stdout
    with open(out / 'benchmark_detectors.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12  # {mmdet, ours, ours NCHW} x {infer, train} x {fp32, bf16}
    impls = ('mmdet', 'ours (MSDeformAttn)', 'ours (MSDeformAttn), NCHW convs')
    assert {(r['impl'], r['mode'], r['dtype']) for r in rows} == {
        (impl, mode, dtype) for impl in impls
        for mode in ('infer', 'train') for dtype in ('float32', 'bfloat16')}
    for row in rows:
        assert row['status'] == 'ok' and row['weights'] == 'strict'
        assert float(row['median_s']) > 0 and float(row['gflop']) > 0
        assert float(row['peak_mib']) > 0 and float(row['speedup_vs_stock_fp32']) > 0
        shares = [float(row[f'share_{s}']) for s in ('backbone', 'neck', 'encoder', 'decoder',
                                                    'head')]
        assert all(s > 0 for s in shares) and sum(shares) <= 100.5
        assert 0 < float(row['share_attention']) < 100
        if row['mode'] == 'train':
            assert float(row['share_backward']) > 0
    stock_fp32 = [r for r in rows if r['impl'] == 'mmdet' and r['dtype'] == 'float32']
    assert all(float(r['speedup_vs_stock_fp32']) == 1.0 for r in stock_fp32)
    # same weights: our MSDeformAttn encoder reproduces mmdet's to rounding
    for impl in impls[1:]:
        ours_infer = next(r for r in rows if r['impl'] == impl
                          and r['mode'] == 'infer' and r['dtype'] == 'float32')
        assert float(ours_infer['encoder_rel_diff']) < 1e-4
    table = (out / 'benchmark_detectors.md').read_text()
    assert '| deformable-detr | ours (MSDeformAttn) | infer | bfloat16 |' in table
    image = cv2.imread(str(out / 'benchmark_detectors.png'))
    assert image is not None and image.std() > 0


def _has_transformers_and_timm():
    import importlib.util
    return all(importlib.util.find_spec(m) is not None for m in ('transformers', 'timm'))


@pytest.mark.skipif(not _has_transformers_and_timm(), reason='the HF pairs need transformers+timm')
def test_hf_pairs_tiny_shape(tmp_path):
    """HF transformers' DETR / Deformable DETR vs ours converted from their save_pretrained
    folders: inference only, fp32 and bf16 autocast, same weights (encoder outputs agree)."""
    out = tmp_path / 'bench'
    proc = subprocess.run(
        [sys.executable, 'tools/analysis/benchmark_detectors.py', '--models', 'hf-detr',
         'hf-deformable-detr', '--modes', 'infer', 'train', '--dtypes', 'float32', 'bfloat16',
         '--shape', '64', '96', '--repeats', '1', '--warmup', '1', '--threads', '1',
         '--out-dir', str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env=dict(os.environ, HF_HUB_OFFLINE='1'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'train: skipped (the HF pairs time inference only)' in proc.stderr
    with open(out / 'benchmark_detectors.csv') as f:
        rows = list(csv.DictReader(f))
    assert {(r['pair'], r['impl'], r['mode'], r['dtype']) for r in rows} == {
        (pair, impl, 'infer', dtype)
        for pair, ours in (('hf-detr', 'ours (converted)'),
                           ('hf-deformable-detr', 'ours (converted, MSDeformAttn)'))
        for impl in ('HF transformers', ours) for dtype in ('float32', 'bfloat16')}
    for row in rows:
        assert row['status'] == 'ok', row
        assert row['weights'] == f"converted ({row['pair']}, strict)"
        assert float(row['median_s']) > 0 and float(row['gflop']) > 0
        assert float(row['share_encoder']) > 0 and float(row['share_attention']) > 0
        if row['dtype'] == 'float32' and row['impl'] != 'HF transformers':
            # ours converted from HF's weights: the same encoder output up to rounding
            assert float(row['encoder_rel_diff']) < 1e-4


def test_refuses_a_case_that_does_not_fit_in_memory(monkeypatch, capsys):
    tool = load_tool()
    monkeypatch.setattr(tool, 'memory_available_bytes', lambda: 2**20)  # 1 MiB free
    status = tool.main(['--models', 'deformable-detr', '--modes', 'infer', '--dtypes',
                        'float32', '--shape', '64', '96', '--repeats', '1', '--no-profile'])
    captured = capsys.readouterr()
    assert status == 3
    assert 'refused: estimated' in captured.err and 'choose a smaller --shape' in captured.err
    assert captured.out.count('refused') == 2  # both models' rows say so


def test_a_failing_case_is_reported_and_the_others_still_run(monkeypatch, capsys):
    tool = load_tool()
    make_step = tool.make_step

    def failing_in_bf16(model, cfg, mode, dtype, data):
        if dtype == 'bfloat16':
            raise RuntimeError('expected scalar type Float but found BFloat16\nmore text')
        return make_step(model, cfg, mode, dtype, data)

    monkeypatch.setattr(tool, 'make_step', failing_in_bf16)
    status = tool.main(['--models', 'deformable-detr', '--modes', 'infer', '--dtypes', 'float32',
                        'bfloat16', '--shape', '64', '96', '--repeats', '1', '--no-profile',
                        '--no-memory-check', '--threads', '1'])
    table = capsys.readouterr().out
    assert status == 3
    assert table.count('failed: RuntimeError: expected scalar type Float but found BFloat16') == 2
    assert 'more text' not in table
    assert table.count('| ok |') == 2  # both fp32 rows were timed


def test_rejects_bad_arguments(capsys):
    tool = load_tool()
    for argv, text in ((['--shape', '16', '96'], '--shape'),
                       (['--dtypes', 'float16'], '--dtypes'),
                       (['--models', 'yolo'], '--models'),
                       (['--models', 'dino', '--shape', '64', '96'], 'too small for dino')):
        with pytest.raises(SystemExit):
            tool.parse_args(argv)
        assert text in capsys.readouterr().err
