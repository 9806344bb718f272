"""Calibrate ACT's clustering per layer: ``mmdet_detrx.tools.analysis.calibrate_act``
(installed: ``detrx-calibrate-act``; same flags)."""
from mmdet_detrx.tools.console import calibrate_act

if __name__ == '__main__':
    raise SystemExit(calibrate_act())
