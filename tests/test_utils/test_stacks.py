"""The installed mmdet stack is checked at import: a mix fails naming versions and a working fix."""
import os
import os.path as osp
import subprocess
import sys

import pytest

from mmdet_detrx.stacks import (ALLOW_UNTESTED_ENV, STACKS, TESTED, UnsupportedStackError,
                                check_stack, installed_stack, requirements)

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def _found(**dists):
    """``_found(mmcv=('openmmlab', '2.1.0'), ...)`` in installed_stack()'s form."""
    found = {module: [] for module in ('mmengine', 'mmcv', 'mmdet')}
    for module, entries in dists.items():
        for family, version in entries if isinstance(entries, list) else [entries]:
            found[module].append((family, STACKS[family][module][0], version))
    return found


def test_the_installed_stack_is_one_supported_family():
    found = installed_stack()
    families = {family for entries in found.values() for family, _, _ in entries}
    assert len(families) == 1 and all(len(entries) == 1 for entries in found.values()), found
    check_stack(found)


@pytest.mark.parametrize('family', list(STACKS))
def test_each_tested_stack_passes(family):
    versions = dict(spec.split('==') for spec in TESTED[family].split())
    check_stack(_found(**{module: (family, versions[dist])
                          for module, (dist, _) in STACKS[family].items()}))


def test_onedl_mmdet_with_openmmlab_mmcv_names_both_and_a_fix():
    found = _found(mmengine=('openmmlab', '0.10.7'), mmcv=('openmmlab', '2.1.0'),
                   mmdet=('onedl', '3.5.1'))
    with pytest.raises(UnsupportedStackError) as info:
        check_stack(found)
    message = str(info.value)
    assert 'onedl-mmdetection 3.5.1' in message and 'mmcv 2.1.0' in message
    assert 'mixed' in message
    assert TESTED['openmmlab'] in message and TESTED['onedl'] in message


def test_mmdet33_with_mmcv22_is_refused_before_mmdet_asserts():
    found = _found(mmengine=('openmmlab', '0.10.7'), mmcv=('openmmlab', '2.2.0'),
                   mmdet=('openmmlab', '3.3.0'))
    with pytest.raises(UnsupportedStackError, match=r'mmcv 2\.2\.0 is outside the supported '
                       r'mmcv>=2\.0\.0,<2\.2\.0') as info:
        check_stack(found)
    assert TESTED['openmmlab'] in str(info.value) and 'STACK=openmmlab' in str(info.value)


def test_two_distributions_of_one_module_are_refused():
    found = _found(mmengine=('onedl', '0.10.12'),
                   mmcv=[('openmmlab', '2.1.0'), ('onedl', '2.3.6')], mmdet=('onedl', '3.5.1'))
    with pytest.raises(UnsupportedStackError, match='two distributions install the `mmcv` '
                       'module'):
        check_stack(found)


def test_opt_in_turns_the_error_into_a_warning(monkeypatch):
    monkeypatch.setenv(ALLOW_UNTESTED_ENV, '1')
    with pytest.warns(RuntimeWarning, match='onedl-mmdetection 3.6.0 is outside'):
        check_stack(_found(mmengine=('onedl', '0.10.12'), mmcv=('onedl', '2.3.6'),
                           mmdet=('onedl', '3.6.0')))


def test_prereleases_compare_by_release():
    check_stack(_found(mmengine=('openmmlab', '0.10.4'), mmcv=('openmmlab', '2.0.0rc4'),
                       mmdet=('openmmlab', '3.3.0')))


def test_extras_are_the_stacks_requirements():
    assert requirements('openmmlab') == ['mmengine>=0.10.4,<0.11', 'mmcv>=2.0.0,<2.2.0',
                                         'mmdet>=3.3.0,<3.4']
    assert [req.split('>=')[0] for req in requirements('onedl')] == [
        'onedl-mmengine', 'onedl-mmcv', 'onedl-mmdetection']


def _fake_distribution(site, name, version):
    info = site / f'{name.replace("-", "_")}-{version}.dist-info'
    info.mkdir()
    (info / 'METADATA').write_text(f'Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n')


@pytest.mark.parametrize('fake', [('mmcv', '2.2.0'), ('onedl-mmdetection', '3.5.1'),
                                  ('mmdet', '3.3.0')])
def test_import_fails_with_the_message_not_deep_in_mmdet(tmp_path, fake):
    """A distribution of the other family (or an mmcv 2.2) shadowing the installed one."""
    installed = {dist for entries in installed_stack().values() for _, dist, _ in entries}
    if fake[0] in installed and fake != ('mmcv', '2.2.0'):
        pytest.skip(f'{fake[0]} is this stack\'s own distribution')
    site = tmp_path / 'site'
    site.mkdir()
    _fake_distribution(site, *fake)
    env = dict(os.environ, PYTHONPATH=f'{site}{os.pathsep}{ROOT}')
    env.pop(ALLOW_UNTESTED_ENV, None)
    code = 'import sys, mmdet_detrx; print(sorted(m for m in sys.modules if m == "mmdet"))'
    proc = subprocess.run([sys.executable, '-c', code], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert 'UnsupportedStackError' in proc.stderr and f'{fake[0]} {fake[1]}' in proc.stderr
    assert 'A working combination' in proc.stderr
    assert 'AssertionError' not in proc.stderr  # mmdet 3.3's own mmcv check never ran
