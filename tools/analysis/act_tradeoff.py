"""ACT accuracy vs cost: ``mmdet_detrx.tools.analysis.act_tradeoff``
(installed: ``detrx-act-tradeoff``; same flags)."""
from mmdet_detrx.tools.console import act_tradeoff

if __name__ == '__main__':
    raise SystemExit(act_tradeoff())
