"""CheckpointMatchHook: a checkpoint that does not fit the model is refused, listing the keys."""
import types

import pytest
import torch
from mmdet.registry import HOOKS
from mmengine.model import BaseTTAModel

import mmdet_detrx  # noqa: F401
from mmdet_detrx.engine.hooks.checkpoint_match_hook import CheckpointMismatchError


class Net(torch.nn.Module):

    def __init__(self, classes=3):
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        self.head = torch.nn.Linear(4, classes)

    def test_step(self, data):
        return data


def _check(model, checkpoint, **kwargs):
    hook = HOOKS.build(dict(type='CheckpointMatchHook', _scope_='mmdet', **kwargs))
    hook.after_load_checkpoint(types.SimpleNamespace(model=model), checkpoint)


def test_matching_checkpoint_passes_with_ddp_prefix_and_old_bn():
    state = Net().state_dict()
    _check(Net(), {'state_dict': state})
    prefixed = {f'module.{k}': v for k, v in state.items() if 'num_batches_tracked' not in k}
    _check(Net(), {'state_dict': prefixed})  # mmengine strips module.; old BN lacks the counter


def test_empty_state_dict_is_refused_listing_missing_keys():
    with pytest.raises(CheckpointMismatchError, match='missing keys') as info:
        _check(Net(), {'state_dict': {}})
    assert 'head.weight' in str(info.value) and '--allow-partial-load' in str(info.value)


def test_unrelated_and_reshaped_weights_are_refused():
    unrelated = {'other.weight': torch.zeros(2), **Net().state_dict()}
    with pytest.raises(CheckpointMismatchError, match='1 unexpected keys.*other.weight'):
        _check(Net(), unrelated)
    with pytest.raises(CheckpointMismatchError, match=r'2 shape mismatches: head.weight \(copying '
                       r'a param with shape torch.Size\(\[5, 4\]\)'):
        _check(Net(), {'state_dict': Net(classes=5).state_dict()})


def test_ignore_keys_is_the_documented_tolerance():
    _check(Net(), {'state_dict': Net(classes=5).state_dict()}, ignore_keys=[r'^head\.'])
    partial = {k: v for k, v in Net(classes=5).state_dict().items() if k != 'backbone.0.bias'}
    with pytest.raises(CheckpointMismatchError, match='1 missing keys.*backbone.0.bias'):
        _check(Net(), {'state_dict': partial}, ignore_keys=[r'^head\.'])


def test_module_that_completes_its_own_state_dict_matches():
    """ACT's E2LSH keeps its seeded hash buffers when a plain DETR checkpoint lacks them."""
    from mmdet_detrx.models.layers.e2lsh import E2LSH

    class WithHash(Net):

        def __init__(self):
            super().__init__()
            self.lsh = E2LSH(dim=4, num_hashes=2, bucket_width=1.0)

    _check(WithHash(), {'state_dict': Net().state_dict()})
    with pytest.raises(CheckpointMismatchError, match='head.weight'):
        _check(WithHash(), {'state_dict': {k: v for k, v in Net().state_dict().items()
                                           if k != 'head.weight'}})


class _TTA(BaseTTAModel):

    def merge_preds(self, data_samples_list):
        return data_samples_list


def test_tta_wrapped_model_is_compared_by_its_module():
    """tools/test.py --tta: the runner's model is DetTTAModel(module=detector)."""
    _check(_TTA(module=Net()), {'state_dict': Net().state_dict()})
