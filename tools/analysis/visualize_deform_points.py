"""Draw deformable sampling points: ``mmdet_detrx.tools.analysis.visualize_deform_points``
(installed: ``detrx-visualize-deform-points``; same flags)."""
from mmdet_detrx.tools.console import visualize_deform_points

if __name__ == '__main__':
    raise SystemExit(visualize_deform_points())
