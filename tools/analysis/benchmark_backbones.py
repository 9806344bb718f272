"""Benchmark the backbones: ``mmdet_detrx.tools.analysis.benchmark_backbones``
(installed: ``detrx-benchmark-backbones``; same flags)."""
from mmdet_detrx.tools.console import benchmark_backbones

if __name__ == '__main__':
    raise SystemExit(benchmark_backbones())
