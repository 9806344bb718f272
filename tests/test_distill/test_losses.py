"""Distillation losses: exact zero at agreement, known values, one-to-one shape checks."""
import pytest
import torch
import torch.nn.functional as F
from mmdet.registry import MODELS

from mmdet_detrx.distill import KLDistillLoss, L1DistillLoss, L2DistillLoss

LOSSES = ['L2DistillLoss', 'L1DistillLoss', 'KLDistillLoss']


@pytest.mark.parametrize('loss_type', LOSSES)
def test_zero_exactly_when_student_equals_teacher(loss_type):
    loss = MODELS.build(dict(type=loss_type, loss_weight=3.0))
    x = torch.randn(6, 2, 10, 4)  # (layers, B, Q, 4)
    assert loss(x, x.clone()).item() == 0.0


def test_known_values():
    student = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    teacher = torch.zeros(2, 2)
    # Per-vector distance, averaged over the vectors.
    assert L2DistillLoss()(student, teacher).item() == pytest.approx(12.5)  # (25 + 0) / 2
    assert L1DistillLoss()(student, teacher).item() == pytest.approx(3.5)  # (7 + 0) / 2
    assert L2DistillLoss(loss_weight=2.0, reduction='sum')(student, teacher).item() == 50.0
    # batchmean: summed over a sample's vectors, averaged over the batch (first) dimension.
    boxes = torch.zeros(2, 3, 4)
    boxes[0, 0, 0], boxes[1, 2, 3] = 1.0, 2.0
    assert L2DistillLoss(reduction='batchmean')(boxes, torch.zeros_like(boxes)).item() == 2.5


@pytest.mark.parametrize('temperature', [1.0, 4.0])
def test_kl_matches_torch(temperature):
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    expected = F.kl_div(F.log_softmax(student / temperature, -1),
                        F.log_softmax(teacher / temperature, -1), log_target=True,
                        reduction='sum') / 10 * temperature**2
    got = KLDistillLoss(temperature=temperature)(student, teacher)
    torch.testing.assert_close(got, expected)


def test_gradient_reaches_student_only_through_the_loss():
    student = torch.randn(3, 4, requires_grad=True)
    teacher = torch.randn(3, 4)
    L2DistillLoss(loss_weight=0.5)(student, teacher).backward()
    torch.testing.assert_close(student.grad, 0.5 * 2 * (student - teacher).detach() / 3)


@pytest.mark.parametrize('loss_cls', [L2DistillLoss, L1DistillLoss, KLDistillLoss])
def test_different_num_queries_is_a_clear_error(loss_cls):
    with pytest.raises(ValueError, match='num_queries'):
        loss_cls()(torch.zeros(6, 2, 300, 4), torch.zeros(6, 2, 100, 4))


def test_bad_arguments():
    with pytest.raises(ValueError, match='reduction'):
        L2DistillLoss(reduction='none')
    with pytest.raises(ValueError, match='loss_weight'):
        L1DistillLoss(loss_weight=-1)
    with pytest.raises(ValueError, match='temperature'):
        KLDistillLoss(temperature=0)
    with pytest.raises(TypeError, match='teacher'):
        L2DistillLoss()(torch.zeros(2, 4), [0.0] * 8)
