"""Forward-hook recorders over named submodules."""
import pytest
import torch
import torch.nn as nn

from mmdet_detrx.distill import ModuleOutputRecorder, RecorderManager


class Head(nn.Module):

    def __init__(self):
        super().__init__()
        self.fc_cls = nn.Linear(4, 3)
        self.fc_reg = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc_cls(x), self.fc_reg(x).sigmoid()


class Net(nn.Module):

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.decoder = nn.ModuleDict({'layers': nn.ModuleList([nn.Linear(4, 4)
                                                               for _ in range(2)])})
        self.bbox_head = Head()

    def forward(self, x):
        x = self.encoder(x)
        for layer in self.decoder['layers']:
            x = layer(x)
        return self.bbox_head(x)


def test_records_each_forward_with_index_path():
    net = Net()
    x = torch.randn(2, 4)
    with ModuleOutputRecorder('bbox_head', index=(1, 0)).register(net) as recorder:
        _, boxes = net(x)
        net(x + 1)
        assert len(recorder.outputs) == 2
        assert torch.equal(recorder.outputs[0], boxes[0])
        assert recorder.last.shape == (4, )
        recorder.clear()
        assert recorder.outputs == []
    net(x)  # removed on exit: nothing recorded any more
    assert recorder.outputs == []


def test_disabled_recorder_records_nothing():
    net = Net()
    recorder = ModuleOutputRecorder('encoder').register(net)
    recorder.enabled = False
    net(torch.randn(1, 4))
    assert recorder.outputs == []
    with pytest.raises(RuntimeError, match='encoder'):
        recorder.last
    recorder.remove()


def test_manager_records_teacher_and_student_under_the_same_keys():
    teacher, student = Net(), Net()
    sources = {'memory': 'encoder', 'dec1': 'decoder.layers.1',
               'logits': dict(module='bbox_head', index=0)}
    x = torch.randn(3, 4)
    with RecorderManager(teacher, sources) as t, RecorderManager(student, sources) as s:
        teacher(x)
        student(x)
        for key in sources:
            assert t.last(key).shape == s.last(key).shape
        assert torch.equal(s.last('logits'), student(x)[0])
        s.clear()
        assert s['memory'].outputs == [] and len(t['memory'].outputs) == 1


def test_unknown_module_lists_close_names():
    with pytest.raises(ValueError, match=r"decoder\.layer\.1.*close names.*'decoder\.layers\.1'"):
        RecorderManager(Net(), {'ok': 'encoder', 'typo': 'decoder.layer.1'})


def test_failed_manager_leaves_no_hook_behind():
    net = Net()
    with pytest.raises(ValueError):
        RecorderManager(net, {'ok': 'encoder', 'typo': 'bbox_haed'})
    assert not net.encoder._forward_hooks


def test_bad_specs():
    with pytest.raises(TypeError, match='module spec'):
        RecorderManager(Net(), ['encoder'])
    with pytest.raises(ValueError, match='unknown recorder spec keys'):
        RecorderManager(Net(), {'x': dict(module='encoder', idx=0)})
    with pytest.raises(TypeError, match='name'):
        ModuleOutputRecorder(3)
