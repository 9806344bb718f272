"""Benchmark our detectors against mmdet's: ``mmdet_detrx.tools.analysis.benchmark_detectors``
(installed: ``detrx-benchmark-detectors``; same flags)."""
from mmdet_detrx.tools.console import benchmark_detectors

if __name__ == '__main__':
    raise SystemExit(benchmark_detectors())
