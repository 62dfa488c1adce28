"""KD loss against a hand computation; the teacher/student wrapper's contract."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qdistill as qd
from qdistill.errors import ConfigError, QDistillError

STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
TEACHER = [[2.0, 1.0, 0.0], [0.5, 0.5, 2.0]]
LABELS = [1, 2]


def softmax(row, t):
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def hand_kd(t, a):
    kl = 0.0
    ce = 0.0
    for s, te, y in zip(STUDENT, TEACHER, LABELS, strict=True):
        p, q = softmax(te, t), softmax(s, t)
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        ce += -math.log(softmax(s, 1.0)[y])
    n = len(LABELS)
    return a * t * t * kl / n + (1 - a) * ce / n


@pytest.mark.parametrize("t,a", [(1.0, 0.5), (2.0, 0.7), (4.0, 0.9), (3.0, 0.0)])
def test_kd_matches_hand_computation(t, a):
    loss = qd.KD(temperature=t, alpha=a)(
        torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS)
    )
    assert float(loss) == pytest.approx(hand_kd(t, a), rel=1e-5)


def test_kd_alpha_one_needs_no_labels_and_is_zero_for_equal_logits():
    s = torch.tensor(STUDENT)
    assert float(qd.KD(alpha=1.0)(s, s.clone(), None)) == pytest.approx(0.0, abs=1e-7)
    assert float(qd.KD(alpha=1.0)(s, torch.tensor(TEACHER), None)) > 0


def test_cross_entropy_matches_torch():
    s, y = torch.tensor(STUDENT), torch.tensor(LABELS)
    assert torch.equal(qd.CrossEntropy()(s, None, y), F.cross_entropy(s, y))


def test_kd_bad_arguments():
    with pytest.raises(ConfigError, match="temperature"):
        qd.KD(temperature=0)
    with pytest.raises(ConfigError, match="alpha"):
        qd.KD(alpha=1.5)
    with pytest.raises(QDistillError, match="differ in shape"):
        qd.KD()(torch.zeros(2, 3), torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(QDistillError, match="needs labels"):
        qd.KD(alpha=0.5)(torch.zeros(2, 3), torch.zeros(2, 3), None)


def test_distiller_freezes_teacher_and_trains_student():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    student = nn.Linear(4, 3)
    run = qd.distill(teacher, student, loss=qd.KD())
    run.train()
    assert not teacher.training and student.training
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    loss, logits = run.step(x, y)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(not p.requires_grad for p in teacher.parameters())
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    # teacher in eval mode: dropout off, so its logits are deterministic
    assert torch.equal(run.teacher_logits(x), run.teacher_logits(x))
    assert [id(p) for p in run.parameters()] == [id(p) for p in student.parameters()]


def test_kd_without_teacher_is_a_config_error():
    with pytest.raises(ConfigError, match="needs a teacher"):
        qd.Distiller(None, nn.Linear(2, 2), qd.KD())
