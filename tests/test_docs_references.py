"""The docs point at files that exist: every ``configs/....py`` and ``tools/...`` path named in the
docs, READMEs, package docstrings and tools, and every relative markdown link, resolves in this
checkout.

Configs move (issue 18 moved three into algorithm folders); a stale path in a command that users
copy fails at their first step, so it fails here first.
"""
import glob
import os.path as osp
import re

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
MARKDOWN = sorted({*glob.glob(osp.join(ROOT, '*.md')), *glob.glob(osp.join(ROOT, 'docs', '*.md')),
                   *glob.glob(osp.join(ROOT, 'configs', '**', '*.md'), recursive=True)})
SOURCES = sorted({*glob.glob(osp.join(ROOT, 'mmdet_detrx', '**', '*.py'), recursive=True),
                  *glob.glob(osp.join(ROOT, 'tools', '**', '*.py'), recursive=True),
                  *glob.glob(osp.join(ROOT, 'tools', '*.sh')),
                  *glob.glob(osp.join(ROOT, 'configs', '**', '*.py'), recursive=True),
                  osp.join(ROOT, 'Makefile')})
# A repository path such as configs/act/x.py, not part of a longer name (my_configs/...).
CONFIG_PATH = re.compile(r'(?<![\w/.-])configs/[\w./-]+\.py')
# tools/x.py, build_tools/y.sh; mmdet's own tools/analysis_tools/ are not ours.
TOOL_PATH = re.compile(r'(?<![\w/.$-])(?:build_)?tools/(?!analysis_tools/)[\w./-]+\.(?:py|sh)')
MARKDOWN_LINK = re.compile(r'\]\(([^)\s]+)\)')


def _rel(path):
    return osp.relpath(path, ROOT)


def _config_paths(path):
    with open(path, encoding='utf-8') as f:
        text = f.read()
    return sorted(set(CONFIG_PATH.findall(text)))


@pytest.mark.parametrize('path', [_rel(p) for p in MARKDOWN + SOURCES if osp.isfile(p)])
def test_named_config_paths_exist(path):
    missing = [name for name in _config_paths(osp.join(ROOT, path))
               if not osp.isfile(osp.join(ROOT, name))]
    assert not missing, f'{path} names configs that do not exist: {missing}'


@pytest.mark.parametrize('path', [_rel(p) for p in MARKDOWN + SOURCES if osp.isfile(p)])
def test_named_tool_paths_exist(path):
    """Tools moved (issue 28: CI scaffolding to build_tools/, the code into mmdet_detrx/tools/)."""
    with open(osp.join(ROOT, path), encoding='utf-8') as f:
        names = sorted(set(TOOL_PATH.findall(f.read())))
    missing = [name for name in names if not osp.isfile(osp.join(ROOT, name))]
    assert not missing, f'{path} names tools that do not exist: {missing}'


@pytest.mark.parametrize('path', [_rel(p) for p in MARKDOWN])
def test_relative_markdown_links_resolve(path):
    with open(osp.join(ROOT, path), encoding='utf-8') as f:
        links = MARKDOWN_LINK.findall(f.read())
    missing = []
    for link in links:
        target = link.split('#', 1)[0]
        if not target or re.match(r'[a-z][a-z0-9+.-]*:', target):  # anchor, URL, mailto
            continue
        if not osp.exists(osp.join(ROOT, osp.dirname(path), target)):
            missing.append(link)
    assert not missing, f'{path} links to paths that do not exist: {missing}'
