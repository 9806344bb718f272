"""The ``detrx-*`` console scripts (``setup.py``'s ``entry_points``): one function per tool.

Each runs ``mmdet_detrx.tools.<module>.main()`` on ``sys.argv`` and returns its exit status, so
``detrx-train ARGS`` = ``python -m mmdet_detrx.tools.train ARGS`` = ``python tools/train.py ARGS``
in a clone. A new tool is one line here and one in ``setup.py``. The tool module is imported
only when its script runs.
"""
import importlib
from typing import Callable

__all__ = [
    'train', 'test', 'export', 'convert', 'act_tradeoff', 'calibrate_act', 'benchmark_act',
    'benchmark_backbones', 'benchmark_botnet', 'benchmark_detectors', 'benchmark_msda',
    'benchmark_onnx', 'browse_dataset', 'compare_ap', 'get_flops', 'visualize_act_clusters',
    'visualize_deform_points'
]


def _tool(module: str) -> Callable[[], int]:
    """A console-script function running ``mmdet_detrx.tools.<module>``'s ``main``."""

    def run() -> int:
        try:
            main = importlib.import_module(f'mmdet_detrx.tools.{module}').main
        except ModuleNotFoundError as error:
            if getattr(error, 'extra', None) is None:  # not a MissingDependencyError
                raise
            raise SystemExit(f'error: {error}') from None  # it names the extra to install
        from mmdet_detrx.tools.common import exit_status
        return exit_status(main())

    run.__name__ = run.__qualname__ = module.rsplit('.', 1)[-1]
    run.__doc__ = f'``python -m mmdet_detrx.tools.{module}``'
    return run


train = _tool('train')  # detrx-train
test = _tool('test')  # detrx-test
export = _tool('deployment.pytorch2onnx')  # detrx-export
convert = _tool('model_converters.convert')  # detrx-convert
act_tradeoff = _tool('analysis.act_tradeoff')  # detrx-act-tradeoff
calibrate_act = _tool('analysis.calibrate_act')  # detrx-calibrate-act
benchmark_act = _tool('analysis.benchmark_act')  # detrx-benchmark-act
benchmark_backbones = _tool('analysis.benchmark_backbones')  # detrx-benchmark-backbones
benchmark_botnet = _tool('analysis.benchmark_botnet')  # detrx-benchmark-botnet
benchmark_detectors = _tool('analysis.benchmark_detectors')  # detrx-benchmark-detectors
benchmark_msda = _tool('analysis.benchmark_msda')  # detrx-benchmark-msda
benchmark_onnx = _tool('analysis.benchmark_onnx')  # detrx-benchmark-onnx
browse_dataset = _tool('analysis.browse_dataset')  # detrx-browse-dataset
compare_ap = _tool('analysis.compare_ap')  # detrx-compare-ap
get_flops = _tool('analysis.get_flops')  # detrx-get-flops
visualize_act_clusters = _tool('analysis.visualize_act_clusters')  # detrx-visualize-act-clusters
visualize_deform_points = _tool('analysis.visualize_deform_points')  # detrx-visualize-deform-points
