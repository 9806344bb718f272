"""What ``import mmdet_detrx`` changes in the process is exactly the list in docs/import.md.

A fresh interpreter imports mmdet (and registers mmdet's modules, as its tools do), snapshots the
process-wide tables, imports ``mmdet_detrx`` and reports what differs. A new process-wide change
fails here until it is decided and written down there.
"""
import json
import subprocess
import sys
import textwrap

import pytest

SNAPSHOT = textwrap.dedent('''
    import json, os
    import mmdet.registry as registries
    from mmdet.utils import register_all_modules
    from mmengine.analysis import complexity_analysis
    from mmengine.config import utils as config_utils
    from mmengine.fileio.backends import registry_utils
    from mmengine.infer import BaseInferencer
    from mmengine.registry import MODELS as MMENGINE_MODELS
    from mmengine.runner import FlexibleRunner, Runner
    from mmengine.runner import checkpoint as mmengine_checkpoint
    from mmengine.runner.checkpoint import CheckpointLoader
    register_all_modules()

    def snapshot():
        return dict(
            registries={name: dict(getattr(registries, name)._module_dict)
                        for name in dir(registries)
                        if hasattr(getattr(registries, name), '_module_dict')},
            schemes=dict(CheckpointLoader._schemes),
            module2package=dict(config_utils.MODULE2PACKAGE),
            flop_handles=dict(complexity_analysis._DEFAULT_SUPPORTED_FLOP_OPS),
            activation_handles=dict(complexity_analysis._DEFAULT_SUPPORTED_ACT_OPS),
            file_backends=dict(registry_utils.backends),
            functions=dict(resume=Runner.resume, flexible_resume=FlexibleRunner.resume,
                           inferencer_init_model=BaseInferencer._init_model,
                           mmengine_build=MMENGINE_MODELS.build_func,
                           mmdet_build=registries.MODELS.build_func,
                           safe_torch_load=getattr(mmengine_checkpoint, '_safe_torch_load', None)),
            environ=dict(os.environ))

    before = snapshot()
    import mmdet_detrx  # noqa: F401
    after = snapshot()
    report = {}
    for table in before:
        if table == 'registries':
            for name, entries in after[table].items():
                old = before[table].get(name, {})
                replaced = sorted(k for k in old if entries.get(k) is not old[k])
                report[f'replaced in {name}'] = replaced
            continue
        old, new = before[table], after[table]
        report[table] = sorted(k for k in set(old) | set(new) if old.get(k) is not new.get(k)
                               and not (table == 'environ' and old.get(k) == new.get(k)))
    print(json.dumps(report))
''')


@pytest.fixture(scope='module')
def changes():
    proc = subprocess.run([sys.executable, '-c', SNAPSHOT], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_nothing_of_mmdet_or_mmengine_is_replaced_in_a_registry(changes):
    """1 (registration): new names only. (3: AmpOptimWrapper is new in mmdet's scope; it
    shadows mmengine's parent entry, which stays.)"""
    assert {k: v for k, v in changes.items() if k.startswith('replaced in') and v} == {}


def test_the_documented_process_wide_changes_and_no_other(changes):
    assert changes['schemes'] == ['', 'http://', 'https://']  # 2
    assert changes['functions'] == sorted(
        ['resume', 'flexible_resume', 'inferencer_init_model', 'mmengine_build', 'mmdet_build'] +
        (['safe_torch_load'] if _onedl() else []))  # 2, 6
    assert changes['module2package'] == ['mmdet_detrx']  # 4
    expected_handles = ['aten::scaled_dot_product_attention', 'detrx::ms_deform_attn_forward']
    assert changes['flop_handles'] == changes['activation_handles'] == expected_handles  # 5
    assert changes['file_backends'] == ['atomic_local']  # 1
    assert changes['environ'] == []


def test_amp_optim_wrapper_name_in_mmdet_scope():
    """3: the name resolves to our factory in mmdet's scope, to mmengine's class in its own."""
    import mmdet_detrx  # noqa: F401
    from mmdet.registry import OPTIM_WRAPPERS
    from mmengine.optim import AmpOptimWrapper
    from mmengine.registry import OPTIM_WRAPPERS as MMENGINE_OPTIM_WRAPPERS

    from mmdet_detrx.engine.optimizers import build_amp_optim_wrapper
    assert OPTIM_WRAPPERS.get('AmpOptimWrapper') is build_amp_optim_wrapper
    assert MMENGINE_OPTIM_WRAPPERS._module_dict['AmpOptimWrapper'] is AmpOptimWrapper


def _onedl():
    from mmengine.runner import checkpoint
    return hasattr(checkpoint, '_safe_torch_load')
