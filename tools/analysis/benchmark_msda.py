"""Benchmark the deformable attention op: ``mmdet_detrx.tools.analysis.benchmark_msda``
(installed: ``detrx-benchmark-msda``; same flags)."""
from mmdet_detrx.tools.console import benchmark_msda

if __name__ == '__main__':
    raise SystemExit(benchmark_msda())
