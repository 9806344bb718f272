"""Analysis tools: benchmarks, FLOPs, ACT calibration and trade-off, AP comparison, pictures."""
