"""Fidelity to the teacher on held-out text (qdistill.distill.lm.metrics.teacher_fidelity) and
the error for a student with nothing to train (a copy of a teacher qd.distill froze)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import qdistill as qd
from qdistill.distill.lm import teacher_fidelity
from qdistill.errors import ConfigError, QDistillError

V = 13


@pytest.fixture
def transformers():
    return pytest.importorskip("transformers")


def tiny_llama(seed, vocab=V):
    import transformers
    from tiny_transformers import llama_config

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(llama_config(transformers, vocab_size=vocab)).eval()


def batches(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, V, (2, 5 + 2 * i), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0  # padded tail
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_fidelity_is_perplexity_agreement_and_the_kl_computed_by_hand(transformers):
    teacher, student = tiny_llama(0), tiny_llama(1)
    data = batches()
    got = teacher_fidelity(student, teacher, data)
    kl_sum, n = 0.0, 0
    with torch.no_grad():
        for b in data:
            s, t = student(**b).logits[:, :-1], teacher(**b).logits[:, :-1]
            m = b["attention_mask"]
            ok = (m[:, :-1] == 1) & (m[:, 1:] == 1)  # position t predicts real token t + 1
            kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="none",
                          log_target=True).sum(-1)  # fmt: skip
            kl_sum += float(kl[ok].sum())
            n += int(ok.sum())
    assert got["kl"] == pytest.approx(kl_sum / n, rel=1e-5)
    assert got["kl"] > 0.01
    assert got["perplexity"] == pytest.approx(qd.perplexity(student, data), rel=1e-6)
    assert got["agreement"] == pytest.approx(qd.greedy_agreement(student, teacher, data))


def test_a_student_equal_to_the_teacher_has_zero_kl_and_full_agreement(transformers):
    teacher = tiny_llama(0)
    got = teacher_fidelity(copy.deepcopy(teacher), teacher, batches())
    assert got["kl"] == pytest.approx(0.0, abs=1e-6)
    assert got["agreement"] == 1.0
    assert math.isfinite(got["perplexity"])


def test_fidelity_over_different_vocabularies_is_refused(transformers):
    with pytest.raises(QDistillError, match="vocabulary"):
        teacher_fidelity(tiny_llama(1, vocab=V + 3), tiny_llama(0), batches())


def test_a_frozen_student_is_refused_before_the_optimizer_sees_no_parameters(transformers):
    teacher = tiny_llama(0)
    qd.distill(teacher, copy.deepcopy(teacher), loss=qd.ForwardKL())  # freezes the teacher
    frozen = copy.deepcopy(teacher)  # ... and so its copies
    run = qd.distill(teacher, frozen, loss=qd.ForwardKL())
    with pytest.raises(ConfigError, match="requires_grad_"):
        qd.fit(run, batches(), epochs=1, progress=False)
    frozen.requires_grad_(True)  # the fix the message names
    history = qd.fit(run, batches(), epochs=1, progress=False)
    assert math.isfinite(history.train_loss[0])


@pytest.mark.parametrize("entry", ["perplexity", "evaluate", "agreement", "fidelity", "fit"])
def test_a_padding_mask_of_the_wrong_shape_is_one_data_error_before_the_model_runs(
    transformers, entry
):
    from qdistill.errors import DataError

    model = tiny_llama(0)
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(4))
    data = [{"input_ids": ids, "attention_mask": torch.ones(2, 8, dtype=torch.long)}]
    calls = {
        "perplexity": lambda: qd.perplexity(model, data),
        "evaluate": lambda: qd.evaluate(model, data),
        "agreement": lambda: qd.greedy_agreement(model, tiny_llama(1), data),
        "fidelity": lambda: teacher_fidelity(model, tiny_llama(1), data),
        "fit": lambda: qd.fit(
            qd.distill(tiny_llama(1), model, loss=qd.ForwardKL()), data, epochs=1, progress=False
        ),
    }
    with pytest.raises(DataError, match=r"attention_mask\) has shape \(2, 8\).*\(2, 9\)"):
        calls[entry]()
