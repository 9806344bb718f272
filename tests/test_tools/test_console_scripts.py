"""The user tools without a clone: every ``detrx-*`` console script (setup.py) runs a module of
``mmdet_detrx.tools`` that has ``main(argv=None)``; ``tools/`` holds only thin wrappers; a
missing optional dependency is an error naming the extra to install."""
import ast
import glob
import importlib
import os.path as osp
import re
import subprocess
import sys

import pytest

from mmdet_detrx.tools import console
from mmdet_detrx.tools.common import exit_status
from mmdet_detrx.utils.optional_deps import MissingDependencyError, import_optional

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def _setup_py_script_names():
    text = open(osp.join(ROOT, 'setup.py')).read()
    block = re.search(r"entry_points=\{'console_scripts': \[(.*?)\]\}", text, re.S).group(1)
    return ast.literal_eval(re.search(r'for name in (\(.*?\))', block, re.S).group(1))


def test_every_console_script_runs_a_tool_module_with_main():
    names = _setup_py_script_names()
    assert sorted(names) == sorted(console.__all__)
    for name in names:
        module = getattr(console, name).__doc__.strip('`').split()[-1]
        assert module.startswith('mmdet_detrx.tools.'), module
        path = osp.join(ROOT, *module.split('.')) + '.py'
        if name == 'convert' and not osp.exists(path):
            continue  # written by the converters' change
        source = open(path).read()
        assert re.search(r'^def main\(argv\b', source, re.M), module
        assert "if __name__ == '__main__':" in source, module


def test_clone_tools_are_thin_wrappers_of_the_package():
    wrappers = [p for p in glob.glob(osp.join(ROOT, 'tools', '**', '*.py'), recursive=True)
                if osp.basename(p) not in ('demo.py', 'check_cuda_kernels.py',
                                           'cuda_link_check.py')]
    assert len(wrappers) >= 16
    for path in wrappers:
        text = open(path).read()
        name = re.search(r'^from mmdet_detrx\.tools\.console import (\w+)$', text, re.M)
        assert name and len(text.splitlines()) <= 6, path
        assert name.group(1) in console.__all__
        # the wrapper and the package module mirror each other's path
        relative = osp.splitext(osp.relpath(path, osp.join(ROOT, 'tools')))[0]
        assert f"``mmdet_detrx.tools.{relative.replace(osp.sep, '.')}``" in text, path


def test_exit_status_of_tool_results():
    assert exit_status(None) == 0 and exit_status(3) == 3
    assert exit_status([{'row': 1}]) == 0 and exit_status({'report': 1}) == 0
    assert exit_status(True) == 0


def test_missing_optional_dependency_names_the_extra():
    with pytest.raises(MissingDependencyError, match=r'pip install "mmdet-detrx\[deploy\]"'):
        import_optional('detrx_no_such_module', 'deploy', 'ONNX export')
    assert import_optional('json', 'deploy', 'x') is importlib.import_module('json')


def test_export_without_onnx_says_which_extra_to_install(tmp_path):
    script = ("import sys; sys.modules['onnx'] = None\n"
              "sys.argv = ['detrx-export', 'c.py', 'k.pth', '--out', 'm.onnx']\n"
              "from mmdet_detrx.tools.console import export\nexport()\n")
    proc = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        'error: ONNX export (mmdet_detrx.deploy) needs onnx, which is not installed: '
        'pip install "mmdet-detrx[deploy]"')


def test_module_and_wrapper_forms_take_the_same_flags(tmp_path):
    for cmd in ([sys.executable, '-m', 'mmdet_detrx.tools.analysis.compare_ap', '--help'],
                [sys.executable, osp.join(ROOT, 'tools', 'analysis', 'compare_ap.py'), '--help']):
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert '--bootstrap' in proc.stdout
