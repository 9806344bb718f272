"""Benchmark ONNX Runtime against PyTorch: ``mmdet_detrx.tools.analysis.benchmark_onnx``
(installed: ``detrx-benchmark-onnx``; same flags)."""
from mmdet_detrx.tools.console import benchmark_onnx

if __name__ == '__main__':
    raise SystemExit(benchmark_onnx())
