import os
import os.path as osp
import sys

import pytest

# tests/_helpers is imported as `_helpers` whatever pytest's import mode (the tools are modules
# of the package: `from mmdet_detrx.tools.analysis import get_flops`).
TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)

# Tests are written for a 2-core CI machine; keep torch from oversubscribing it.
os.environ.setdefault('OMP_NUM_THREADS', '2')


def pytest_addoption(parser):
    parser.addoption('--runslow', action='store_true', default=False,
                     help='also run tests marked @pytest.mark.slow')


# The mmdet-integration subset (marker `mmdet_integration`, `make test-integration`): tests that
# run mmdet/mmengine code paths a change of stack (OpenMMLab vs OneDL) can break: detectors and
# their equality with mmdet's, configs, tools, the wheel, hooks, datasets, checkpoint converters
# and safe loading. CI runs it on the non-default stack (.ci/run); the op and layer tests do not
# depend on the stack.
MMDET_INTEGRATION = ('test_models/test_detectors/', 'test_configs.py', 'test_datasets/',
                     'test_engine/', 'test_tools/', 'test_converters/',
                     'test_packaging/test_wheel.py', 'test_packaging/test_shipped_configs.py',
                     'test_utils/test_safe_checkpoint.py', 'test_utils/test_safe_loading_stacks.py',
                     'test_utils/test_stacks.py', 'test_utils/test_import_time.py')


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: long-running test, run with --runslow')
    config.addinivalue_line('markers', 'cuda: needs a CUDA device')
    config.addinivalue_line('markers', 'mmdet_integration: exercises mmdet/mmengine code paths '
                            '(tests/conftest.py MMDET_INTEGRATION); run on every stack')


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = osp.relpath(str(item.fspath), TESTS).replace(os.sep, '/')
        if path.startswith(MMDET_INTEGRATION):
            item.add_marker(pytest.mark.mmdet_integration)
    if config.getoption('--runslow'):
        return
    skip_slow = pytest.mark.skip(reason='slow: run with --runslow (make test-all)')
    for item in items:
        if 'slow' in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True, scope='session')
def _mmdet_default_scope():
    """Resolve bare type names (LoadAnnotations, ...) in mmdet's scope, as mmdet's configs do."""
    try:
        from mmengine.registry import init_default_scope
        import mmdet_detrx  # noqa: F401
    except ImportError:  # op-only machine (torch without mmdet)
        yield
        return
    init_default_scope('mmdet')
    yield
