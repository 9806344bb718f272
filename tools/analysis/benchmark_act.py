"""Benchmark ACT against exact attention: ``mmdet_detrx.tools.analysis.benchmark_act``
(installed: ``detrx-benchmark-act``; same flags)."""
from mmdet_detrx.tools.console import benchmark_act

if __name__ == '__main__':
    raise SystemExit(benchmark_act())
