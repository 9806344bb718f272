"""mmdet_detrx/tools/common.py: the shape flag, peak memory and ACT layer lookup the tools share
(timing, tables and charts: tests/test_tools/test_benchmark_detectors.py)."""
import argparse

import pytest
import torch

from mmdet_detrx.tools import common


def _shape_parser(**kwargs):
    parser = argparse.ArgumentParser()
    common.add_shape_arg(parser, **kwargs)
    return parser


def test_shape_takes_h_w_and_hxw():
    parser = _shape_parser()
    assert parser.parse_args([]).shape == (800, 1333)
    assert parser.parse_args(['--shape', '64', '96']).shape == (64, 96)
    assert parser.parse_args(['--shape', '64x96']).shape == (64, 96)
    assert parser.parse_args(['--shape=64x96']).shape == (64, 96)
    assert _shape_parser(default=None).parse_args([]).shape is None
    assert 'H W or HxW (default 800 1333)' in parser.format_help()


@pytest.mark.parametrize('argv', [['64'], ['64', 'x'], ['64', '96', '3'], ['0', '96'],
                                  ['64x-1']])
def test_shape_rejects_other_forms_naming_both(argv, capsys):
    with pytest.raises(SystemExit):
        _shape_parser().parse_args(['--shape', *argv])
    err = capsys.readouterr().err
    assert '--shape' in err and ('H W' in err or 'positive' in err)


def test_peak_memory_measures_growth_over_the_region():
    if not common.PeakMemory.supported():
        pytest.skip('needs /proc/self/clear_refs (Linux)')
    meter = common.PeakMemory()
    meter.start()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written
    del block
    grown = meter.stop()
    assert 48 * 2**20 < grown < 512 * 2**20
    meter.start()  # a smaller second region keeps the maximum
    assert meter.stop() == grown


def test_act_layers_and_the_error_without_them():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert common.act_layers(model) == {}
    with pytest.raises(ValueError, match='my.py has no AdaptiveClusteringAttention layer; use '
                       'an ACT config'):
        common.require_act_layers(model, 'my.py')
