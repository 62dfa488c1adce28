"""Language-model distillation: token losses against direct (unchunked) references, chunked
memory, dict batches through distill/fit/evaluate, perplexity and greedy agreement."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import qdistill as qd
from qdistill.distill.lm import split_batch
from qdistill.errors import DataError, QDistillError

B, T, V = 3, 7, 11
GEN = torch.Generator().manual_seed(0)
S = torch.randn(B, T, V, generator=GEN) * 2
TT = torch.randn(B, T, V, generator=GEN) * 2
MASK = torch.ones(B, T, dtype=torch.long)
MASK[1, 5:] = 0  # right padding
MASK[2, :2] = 0  # left padding
LABELS = torch.randint(0, V, (B, T), generator=GEN).masked_fill(MASK == 0, -100)
LABELS[0, 3] = -100  # an ignored label inside a sequence


def shifted(x):
    return x[:, :-1]


def counted():
    """Reference positions, computed by slicing: prediction t counts if tokens t and t+1 are
    real and label t+1 is not ignored."""
    return (MASK[:, :-1] == 1) & (MASK[:, 1:] == 1) & (LABELS[:, 1:] != -100)


def per_token_mean(values):
    w = counted()
    return values[w].mean()


def ref_forward_kl(s, t, temp=1.0):
    kl = F.kl_div(
        F.log_softmax(shifted(s) / temp, -1), F.log_softmax(shifted(t) / temp, -1),
        reduction="none", log_target=True,
    ).sum(-1)  # fmt: skip
    return per_token_mean(kl) * temp**2


def ref_reverse_kl(s, t, temp=1.0):
    kl = F.kl_div(
        F.log_softmax(shifted(t) / temp, -1), F.log_softmax(shifted(s) / temp, -1),
        reduction="none", log_target=True,
    ).sum(-1)  # fmt: skip
    return per_token_mean(kl) * temp**2


def ref_jsd(s, t, beta):
    p_s, p_t = F.softmax(shifted(s), -1), F.softmax(shifted(t), -1)
    m = beta * p_t + (1 - beta) * p_s
    js = beta * (p_t * (p_t / m).log()).sum(-1) + (1 - beta) * (p_s * (p_s / m).log()).sum(-1)
    return per_token_mean(js)


def ref_topk(s, t, k, temp=1.0):
    st, tt = shifted(s) / temp, shifted(t) / temp
    top, idx = tt.topk(k, dim=-1)
    q = torch.zeros_like(tt).scatter(-1, idx, F.softmax(top, -1))  # dense truncated teacher
    log_p = F.log_softmax(st, -1)
    terms = torch.where(q > 0, q * (q.clamp_min(1e-30).log() - log_p), torch.zeros_like(q))
    return per_token_mean(terms.sum(-1)) * temp**2


def ref_ce(s):
    w = counted()
    return F.cross_entropy(shifted(s)[w], LABELS[:, 1:][w])


CASES = [
    (qd.ForwardKL(chunk=2), lambda s, t: ref_forward_kl(s, t)),
    (qd.ForwardKL(temperature=2.0, chunk=4), lambda s, t: ref_forward_kl(s, t, 2.0)),
    (qd.ReverseKL(chunk=3), lambda s, t: ref_reverse_kl(s, t)),
    (qd.GeneralizedJSD(beta=0.5, chunk=2), lambda s, t: ref_jsd(s, t, 0.5)),
    (qd.GeneralizedJSD(beta=0.9, chunk=5), lambda s, t: ref_jsd(s, t, 0.9)),
    (qd.TopKKD(k=3, chunk=2), lambda s, t: ref_topk(s, t, 3)),
    (qd.TopKKD(k=4, temperature=2.0, chunk=64), lambda s, t: ref_topk(s, t, 4, 2.0)),
    (qd.ForwardKL(alpha=0.3, chunk=2), lambda s, t: 0.3 * ref_forward_kl(s, t) + 0.7 * ref_ce(s)),
]


@pytest.mark.parametrize("loss,reference", CASES, ids=[repr(c[0]) for c in CASES])
def test_token_loss_and_its_gradient_match_the_direct_computation(loss, reference):
    s1 = S.clone().requires_grad_(True)
    s2 = S.clone().requires_grad_(True)
    ours = loss(s1, TT, LABELS, mask=MASK)
    ref = reference(s2, TT)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    ours.backward()
    ref.backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-6)
    # positions that do not count get no gradient at all
    assert s1.grad[1, 4:].abs().sum() == 0 and s1.grad[2, :2].abs().sum() == 0


def test_top_k_over_the_whole_vocabulary_is_the_forward_kl():
    full = qd.TopKKD(k=V, temperature=2.0)(S, TT, LABELS, mask=MASK)
    assert full.item() == pytest.approx(ref_forward_kl(S, TT, 2.0).item(), rel=1e-5)


def test_without_shift_every_real_position_scores_itself():
    ours = qd.ForwardKL(shift=False, chunk=2)(S, TT, None, mask=MASK)
    kl = F.kl_div(F.log_softmax(S, -1), F.log_softmax(TT, -1), reduction="none", log_target=True)
    assert ours.item() == pytest.approx(kl.sum(-1)[MASK == 1].mean().item(), rel=1e-5)


def test_token_cross_entropy_is_the_models_own_next_token_loss():
    assert qd.TokenCrossEntropy(chunk=2)(S, None, LABELS, mask=MASK).item() == pytest.approx(
        ref_ce(S).item(), rel=1e-6
    )


def test_chunked_loss_never_keeps_more_than_one_chunk_of_probabilities_for_backward():
    """Every tensor autograd saves is at most one chunk of rows [chunk, V] (the logit views
    the checkpointed chunks hold), never a full [N, V] softmax."""
    b, t, v, chunk = 2, 64, 50, 16
    s = torch.randn(b, t, v, requires_grad=True)
    teacher = torch.randn(b, t, v)
    sizes = []

    def pack(x):
        sizes.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = qd.GeneralizedJSD(chunk=chunk)(s, teacher, None)
    loss.backward()
    assert sizes and max(sizes) <= chunk * v < b * t * v
    assert s.grad is not None and s.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- bad input
def test_mismatched_vocabularies_are_refused_with_the_fix():
    with pytest.raises(QDistillError, match=r"teacher vocabulary \(12 tokens\).*\(11\).*tokenizer"):
        qd.ForwardKL()(S, torch.randn(B, T, 12), LABELS)


def test_a_padding_mask_of_the_wrong_shape_is_refused():
    with pytest.raises(DataError, match=r"padding mask.*\(3, 6\).*\(3, 7\)"):
        qd.ReverseKL()(S, TT, LABELS, mask=MASK[:, :-1])


def test_a_hard_term_without_labels_is_refused():
    with pytest.raises(QDistillError, match="needs labels"):
        qd.TopKKD(alpha=0.5)(S, TT, None, mask=MASK)


def test_loss_arguments_are_checked():
    for bad in (lambda: qd.GeneralizedJSD(beta=1.0), lambda: qd.TopKKD(k=0),
                lambda: qd.ForwardKL(temperature=0), lambda: qd.ReverseKL(alpha=2)):  # fmt: skip
        with pytest.raises(qd.ConfigError):
            bad()


# ---------------------------------------------------------------------------- with models
@pytest.fixture
def transformers():
    """The model tests need transformers; the loss tests above do not."""
    return pytest.importorskip("transformers")


def tiny_llama(seed):
    import transformers
    from tiny_transformers import llama_config

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(llama_config(transformers, vocab_size=V)).eval()


def batches(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, V, (2, 6 + i), generator=g)
        mask = torch.ones_like(ids)
        mask[1, -2:] = 0  # padded tail
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_distill_fit_evaluate_run_a_causal_lm_on_dict_batches(transformers):
    teacher = tiny_llama(0)
    student = qd.quantize_(copy.deepcopy(teacher), qd.QuantConfig(weights=qd.int2()))
    data = batches()
    run = qd.distill(teacher, student, loss=qd.ForwardKL(temperature=1.0))
    before = [float(run.step(b, split_batch(b)[1])[0].detach()) for b in data]
    history = qd.fit(run, data, epochs=3, lr=1e-2, progress=False, val_loader=data)
    after = [float(run.step(b, split_batch(b)[1])[0].detach()) for b in data]
    assert sum(after) < sum(before)
    assert len(history.train_acc) == 3 and 0.0 <= history.val_acc[-1] <= 1.0
    # evaluate = next-token accuracy over unpadded positions, counted by hand here
    correct = total = 0
    with torch.no_grad():
        for b in data:
            pred = student(**b).logits.argmax(-1)
            m = b["attention_mask"]
            ok = (m[:, :-1] == 1) & (m[:, 1:] == 1)
            correct += int(((pred[:, :-1] == b["input_ids"][:, 1:]) & ok).sum())
            total += int(ok.sum())
    assert qd.evaluate(student, data) == pytest.approx(correct / total)


def test_supervised_token_cross_entropy_trains_without_a_teacher(transformers):
    student = qd.quantize_(tiny_llama(0), qd.QuantConfig(weights=qd.int4(group_size=32)))
    data = batches()
    start = qd.perplexity(student, data)
    qd.fit(qd.supervised(student, qd.TokenCrossEntropy()), data, epochs=3, lr=1e-2, progress=False)
    assert qd.perplexity(student, data) < start


def test_perplexity_is_token_weighted_and_matches_transformers_loss(transformers):
    model = tiny_llama(0)
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hf_loss = model(input_ids=ids, labels=ids).loss
    assert qd.perplexity(model, [{"input_ids": ids}]) == pytest.approx(
        math.exp(hf_loss.item()), rel=1e-5
    )
    # two batches of different token counts: exp(total NLL / total tokens), not a mean of ppls
    short, long = ids[:, :3], ids
    with torch.no_grad():
        nll_s = model(input_ids=short, labels=short).loss.item() * 2 * 2
        nll_l = model(input_ids=long, labels=long).loss.item() * 2 * 8
    expected = math.exp((nll_s + nll_l) / (4 + 16))
    got = qd.perplexity(model, [{"input_ids": short}, {"input_ids": long}])
    assert got == pytest.approx(expected, rel=1e-5)


def test_greedy_agreement_with_the_teacher(transformers):
    teacher, other = tiny_llama(0), tiny_llama(1)
    data = batches()
    assert qd.greedy_agreement(copy.deepcopy(teacher), teacher, data) == 1.0
    agree = total = 0
    with torch.no_grad():
        for b in data:
            same = other(**b).logits.argmax(-1) == teacher(**b).logits.argmax(-1)
            m = b["attention_mask"]
            ok = (m[:, :-1] == 1) & (m[:, 1:] == 1)
            agree += int((same[:, :-1] & ok).sum())
            total += int(ok.sum())
    assert qd.greedy_agreement(other, teacher, data) == pytest.approx(agree / total)
    assert agree < total


def test_a_transformers_classifier_distils_on_dict_batches_with_labels(transformers):
    from tiny_transformers import bert_config

    torch.manual_seed(0)
    teacher = transformers.BertForSequenceClassification(
        bert_config(transformers, vocab_size=V, num_labels=3)
    ).eval()
    student = qd.quantize_(copy.deepcopy(teacher), qd.QuantConfig(weights=qd.int4(group_size=32)))
    g = torch.Generator().manual_seed(2)
    data = [
        {"input_ids": torch.randint(0, V, (4, 6), generator=g),
         "attention_mask": torch.ones(4, 6, dtype=torch.long),
         "labels": torch.randint(0, 3, (4,), generator=g)}
        for _ in range(3)
    ]  # fmt: skip
    history = qd.fit(qd.distill(teacher, student, loss=qd.KD()), data, epochs=1, progress=False)
    assert len(history.train_loss) == 1 and math.isfinite(history.train_loss[0])
    with torch.no_grad():
        hits = sum(
            int((student(input_ids=b["input_ids"]).logits.argmax(-1) == b["labels"]).sum())
            for b in data
        )
    assert qd.evaluate(student, data) == pytest.approx(hits / 12)  # per sample, not per token
