"""tools/analysis/benchmark_msda.py end to end on a tiny shape: table, CSV, linear chart."""
import csv

import pytest

from mmdet_detrx.ops import native_available
from mmdet_detrx.tools.analysis import benchmark_msda as tool

pytestmark = pytest.mark.skipif(not native_available(), reason='mmdet_detrx._C not built')

TINY = (((4, 6), (2, 3)), None)  # 30 tokens, every token a query


@pytest.fixture
def tiny_shape(monkeypatch):
    monkeypatch.setitem(tool.SHAPES, 'tiny', TINY)
    monkeypatch.setitem(tool.SHAPES, 'tiny_decoder', (TINY[0], 5))


def test_table_csv_and_chart(tiny_shape, tmp_path, capsys):
    out_dir = tmp_path / 'out'
    rows = tool.main(['--shapes', 'tiny', 'tiny_decoder', '--threads', '1', '--repeats', '1',
                      '--warmup', '0', '--batch', '1', '--mixed', 'bfloat16', '--peak-gbps', '100',
                      '--out-dir', str(out_dir)])
    impls = ['native', 'pytorch', 'native bfloat16 value']
    assert [(r['shape'], r['impl']) for r in rows] == [
        (shape, impl) for shape in ('tiny', 'tiny_decoder') for impl in impls]
    assert [r['queries'] for r in rows] == [30] * 3 + [5] * 3
    assert all(r['forward_ms'] > 0 and r['fwd_bwd_ms'] > 0 for r in rows)
    reference = rows[1]['fwd_bwd_ms']
    assert rows[0]['speed_up'] == f'{reference / rows[0]["fwd_bwd_ms"]:.1f}x'
    assert 'vs native' in rows[2]['speed_up']

    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith('|')]
    # build_tools/gpu_check.sh reads these columns by position: shape, ..., impl, forward, fwd+bwd
    assert table[0].split('|')[1:8] == [
        ' shape ', ' queries ', ' threads ', ' impl ', ' forward ms ', ' fwd+bwd ms ',
        ' fwd+bwd speed-up ']
    assert len(table) == 2 + len(rows)
    assert (out_dir / 'msda.md').read_text().strip() == '\n'.join(table)
    with open(out_dir / 'msda.csv') as f:
        assert [r['impl'] for r in csv.DictReader(f)] == [r['impl'] for r in rows]
    assert (out_dir / 'msda.png').stat().st_size > 0


def test_chart_is_linear_with_ratio_labels(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    rows = [dict(dtype='float32', shape='s', threads=1, impl='native', fwd_bwd_ms=10.0),
            dict(dtype='float32', shape='s', threads=1, impl='pytorch', fwd_bwd_ms=30.0)]
    seen = {}
    real_savefig = plt.Figure.savefig

    def spy(fig, path, **kwargs):
        ax = fig.axes[0]
        seen['scale'] = ax.get_yscale()
        seen['labels'] = [t.get_text() for t in ax.texts]
        return real_savefig(fig, path, **kwargs)

    monkeypatch.setattr(plt.Figure, 'savefig', spy)
    tool.save_chart(rows, str(tmp_path / 'c.png'), 'title')
    assert seen['scale'] == 'linear'
    assert '3.00x' in seen['labels']  # the native bar carries its speed-up over the reference


def test_old_flag_spellings_still_parse():
    args = tool.parse_args(['--repeat', '2', '--dtype', 'float16', '--out-png', 'x.png'])
    assert (args.repeats, args.dtypes, args.out_png) == (2, ['float16'], 'x.png')
    with pytest.raises(SystemExit):
        tool.parse_args(['--device', 'tpu'])


def test_cpu_levels_and_copy_bandwidth(capsys):
    """--cpu-levels times the native op at a forced ISA level in a child process (the level is
    fixed at load); --vs-copy reports GB/s against the measured copy bandwidth."""
    rows = tool.main(['--shapes', 'small', '--threads', '1', '--repeats', '1', '--warmup', '0',
                      '--batch', '1', '--skip-reference', '--cpu-levels', 'default',
                      '--vs-copy', '--copy-mib', '8'])
    printed = capsys.readouterr().out
    assert 'copy bandwidth: ' in printed and 'per CPU ISA level' in printed
    assert [(r['shape'], r['level'], r['impl']) for r in rows] == [('small', 'default', 'native')]
    assert rows[0]['vs_first'] == '1.00x fwd, 1.00x fwd+bwd'
    assert rows[0]['fwd_bwd_gbps'].endswith('%)')


def test_cpu_levels_unknown_to_this_cpu_are_refused(tiny_shape):
    with pytest.raises(SystemExit, match='not supported here'):
        tool.main(['--shapes', 'tiny', '--cpu-levels', 'avx1024'])
