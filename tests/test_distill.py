"""KD loss against a hand computation; the teacher/student wrapper's contract."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qdistill as qd
from qdistill.distill import kd_kl
from qdistill.errors import ConfigError, QDistillError

STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
TEACHER = [[2.0, 1.0, 0.0], [0.5, 0.5, 2.0]]
LABELS = [1, 2]


def softmax(row, t):
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def hand_kl(t):
    """Mean over the 2 samples of sum_c p_c log(p_c / q_c), p = teacher, q = student at T."""
    kl = 0.0
    for s, te in zip(STUDENT, TEACHER, strict=True):
        p, q = softmax(te, t), softmax(s, t)
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    return kl / len(STUDENT)


def hand_ce():
    return -sum(math.log(softmax(s, 1.0)[y]) for s, y in zip(STUDENT, LABELS, strict=True)) / 2


def hand_kd(t, a):
    return a * t * t * hand_kl(t) + (1 - a) * hand_ce()


def test_hand_reference_is_not_trivial():
    # pinned values of the reference itself, so an edit to it cannot go unnoticed.
    # CE by hand: mean(log(1 + e^-1 + e^-1.5), log(1 + e^-3 + e^-4)) = mean(0.464369, 0.065884)
    assert hand_ce() == pytest.approx((0.464369 + 0.065884) / 2, abs=1e-6)
    assert hand_kl(2.0) == pytest.approx(0.115825, abs=1e-6)  # also checked with numpy


def test_kd_kl_matches_hand_computation_without_t_squared():
    s, t = torch.tensor(STUDENT), torch.tensor(TEACHER)
    for temp in (1.0, 2.0, 5.0):
        assert float(kd_kl(s, t, temp)) == pytest.approx(hand_kl(temp), rel=1e-5)
    # the soft term alone (alpha=1) carries the T^2 factor: 4x kd_kl at T=2
    assert float(qd.KD(temperature=2.0, alpha=1.0)(s, t, None)) == pytest.approx(
        4 * hand_kl(2.0), rel=1e-5
    )


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
    for bad in (0, -1.0, float("nan"), "2", True):
        with pytest.raises(ConfigError, match=r"temperature=.*positive"):
            qd.KD(temperature=bad)
    for bad in (1.5, -0.1, float("nan"), None):
        with pytest.raises(ConfigError, match=r"alpha=.*between 0 and 1"):
            qd.KD(alpha=bad)
    with pytest.raises(ConfigError, match="temperature"):
        kd_kl(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)
    with pytest.raises(QDistillError, match=r"\(2, 3\).*\(2, 4\)"):
        kd_kl(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)
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
    with pytest.raises(ConfigError, match="needs a teacher"):
        qd.distill(None, nn.Linear(2, 2))


def test_reprs_are_readable():
    assert repr(qd.KD(temperature=4, alpha=0.9)) == "KD(temperature=4, alpha=0.9)"
    assert repr(qd.CrossEntropy()) == "CrossEntropy()"
    assert "KD(temperature=2, alpha=0.7)" in repr(qd.distill(nn.Linear(2, 2), nn.Linear(2, 2)))


def test_distiller_modes_call_and_factories():
    teacher, student = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)), nn.Linear(3, 3)
    run = qd.distill(teacher, student)
    assert isinstance(run.loss, qd.KD) and run.loss.temperature == 2.0 and run.loss.alpha == 0.7
    assert not isinstance(run, nn.Module)  # its state is only the student's
    run.eval()
    assert not student.training and not teacher.training
    run.train()
    assert student.training and not teacher.training
    teacher.train()  # switched behind the wrapper's back: teacher_logits puts it back
    x = torch.randn(4, 3)
    assert torch.equal(run.teacher_logits(x), run.teacher_logits(x))
    assert not teacher.training
    assert torch.equal(run(x), student(x))

    sup = qd.supervised(student)
    assert sup.teacher is None and isinstance(sup.loss, qd.CrossEntropy)
    y = torch.tensor([0, 1, 2, 0])
    loss, logits = sup.step(x, y)
    assert torch.equal(loss, F.cross_entropy(logits, y))
    with pytest.raises(ConfigError, match="same module"):
        qd.distill(student, student)


def test_distill_step_loss_equals_kd_of_both_models():
    torch.manual_seed(1)
    teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    run = qd.distill(teacher, student, loss=qd.KD(temperature=3.0, alpha=0.5))
    loss, logits = run.step(x, y)
    loss = loss.detach()
    s, t = student(x).detach(), teacher(x).detach()
    ls, lt = F.log_softmax(s / 3, -1), F.log_softmax(t / 3, -1)
    ref = 0.5 * 9 * (lt.exp() * (lt - ls)).sum(-1).mean() + 0.5 * F.cross_entropy(s, y)
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    assert torch.equal(logits.detach(), s)
