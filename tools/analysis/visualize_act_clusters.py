"""Draw ACT's clusters: ``mmdet_detrx.tools.analysis.visualize_act_clusters``
(installed: ``detrx-visualize-act-clusters``; same flags)."""
from mmdet_detrx.tools.console import visualize_act_clusters

if __name__ == '__main__':
    raise SystemExit(visualize_act_clusters())
