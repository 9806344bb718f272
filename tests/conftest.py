import os
import sys

import pytest

# tests/_helpers is imported as `_helpers` whatever pytest's import mode; tools/analysis is on
# the path as when its scripts run, so a tool imported by path finds `from _common import ...`.
TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)
sys.path.insert(1, os.path.join(os.path.dirname(TESTS), 'tools', 'analysis'))

# Tests are written for a 2-core CI machine; keep torch from oversubscribing it.
os.environ.setdefault('OMP_NUM_THREADS', '2')


def pytest_addoption(parser):
    parser.addoption('--runslow', action='store_true', default=False,
                     help='also run tests marked @pytest.mark.slow')


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: long-running test, run with --runslow')
    config.addinivalue_line('markers', 'cuda: needs a CUDA device')


def pytest_collection_modifyitems(config, items):
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
