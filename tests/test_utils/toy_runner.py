"""A seconds-long mmengine Runner config (toy model and data) for checkpoint tests."""
import itertools
import os.path as osp

import torch
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, MODELS
from torch.utils.data import Dataset


_RUNNER_IDS = itertools.count()


@MODELS.register_module(force=True)
class DetrxToyModel(BaseModel):

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)
        self.bn = torch.nn.BatchNorm1d(1)

    def forward(self, inputs, labels=None, mode='tensor'):
        inputs = torch.stack(inputs) if isinstance(inputs, (list, tuple)) else inputs
        out = self.bn(self.linear(inputs))
        if mode == 'loss':
            labels = torch.stack(labels) if isinstance(labels, (list, tuple)) else labels
            return dict(loss=((out.squeeze(-1) - labels)**2).mean())
        return out


@DATASETS.register_module(force=True)
class DetrxToyDataset(Dataset):
    metainfo = dict(classes=('x', ))

    def __len__(self):
        return 8

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        return dict(inputs=torch.randn(2, generator=generator),
                    labels=torch.tensor(float(index % 2)))


def toy_runner_cfg(work_dir, max_iters, **kwargs):
    # mmengine names a runner's MessageHub/logger/visualizer singletons after its experiment,
    # by default the start time in seconds: two runners started within one second share one
    # MessageHub, and the second sees the first's loss history. A unique name per runner.
    kwargs.setdefault('experiment_name', f'toy_{next(_RUNNER_IDS)}_{osp.basename(work_dir)}')
    return dict(
        model=dict(type='DetrxToyModel'),
        work_dir=str(work_dir),
        train_dataloader=dict(dataset=dict(type='DetrxToyDataset'),
                              sampler=dict(type='DefaultSampler', shuffle=True),
                              batch_size=2, num_workers=0),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01, momentum=0.9)),
        param_scheduler=dict(type='MultiStepLR', milestones=[1], by_epoch=False),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1, by_epoch=False),
                           logger=dict(type='LoggerHook', interval=1)),
        default_scope='mmdet',  # as mmdet configs (and the rest of the test session) use
        randomness=dict(seed=0),
        **kwargs)
