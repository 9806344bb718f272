"""tools/train.py and tools/test.py start-up helpers."""
import pytest
import torch.distributed as dist

from mmdet_detrx.utils import distributed_teardown


def _init_single_process_group(tmp_path):
    dist.init_process_group(backend='gloo', init_method=f'file://{tmp_path}/store', rank=0,
                            world_size=1)


def test_teardown_destroys_group_after_success(tmp_path):
    with distributed_teardown():
        _init_single_process_group(tmp_path)
        assert dist.is_initialized()
    assert not dist.is_initialized()


def test_teardown_destroys_group_when_training_raises(tmp_path):
    with pytest.raises(RuntimeError, match='diverged'):
        with distributed_teardown():
            _init_single_process_group(tmp_path)
            raise RuntimeError('loss diverged')
    assert not dist.is_initialized()


def test_teardown_without_group_is_a_no_op():
    with distributed_teardown():
        pass
    assert not dist.is_initialized()
