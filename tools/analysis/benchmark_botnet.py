"""Benchmark BoTNet against ResNet: ``mmdet_detrx.tools.analysis.benchmark_botnet``
(installed: ``detrx-benchmark-botnet``; same flags)."""
from mmdet_detrx.tools.console import benchmark_botnet

if __name__ == '__main__':
    raise SystemExit(benchmark_botnet())
