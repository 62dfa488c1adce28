"""Intermediate-layer distillation: pattern mapping, hook capture, hint / attention / relation
losses against hand computations, adapters trained by fit, padding, saving, end to end."""

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import qdistill as qd
from qdistill.distill.attention import QKVCapture, attention_relation_loss
from qdistill.distill.layers import (
    Adapter,
    FeatureCapture,
    attention_kl,
    attention_mse,
    hidden_cosine,
    hidden_mse,
    match_modules,
)
from qdistill.distill.lm import split_batch
from qdistill.errors import ConfigError

V = 11


class TinyCNN(nn.Module):
    def __init__(self, width: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1)
        )
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(width, 4)

    def forward(self, x):
        return self.fc(self.head(self.features(x)))


def images(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 4, (4,), generator=g))
            for _ in range(n)]  # fmt: skip


def no_hooks(model):
    """No capture hook of ours left (transformers adds its own output-recording hooks)."""
    return not any(
        "FeatureCapture" in getattr(h, "__qualname__", "")
        for m in model.modules()
        for h in m._forward_hooks.values()
    )


# ------------------------------------------------------------------------------ mapping, hooks
def test_hook_captures_exactly_the_module_output_and_leaves_no_hook():
    model = TinyCNN(8, 0).eval()
    x = images(1)[0][0]
    with FeatureCapture(model, ["features.2", "features.0"]) as cap:
        model(x)
    assert torch.equal(cap["features.2"], model.features(x))
    assert torch.equal(cap["features.0"], model.features[0](x))
    assert all(not m._forward_hooks for m in model.modules())
    cap.open()  # the same capture without a context: close() removes its hooks
    assert not no_hooks(model)
    cap.close()
    assert no_hooks(model)


def test_patterns_exact_glob_and_regex_in_module_order():
    model = TinyCNN(8, 0)
    assert match_modules(model, "features.2") == ["features.2"]
    assert match_modules(model, "features.*") == ["features.0", "features.1", "features.2"]
    assert match_modules(model, "re:features\\.(0|2)") == ["features.0", "features.2"]
    assert match_modules(model, "**.2") == ["features.2", "head.2"]


def test_a_pattern_that_matches_nothing_names_the_pattern_model_and_choices():
    t, s = TinyCNN(8, 0), TinyCNN(8, 1)
    with pytest.raises(ConfigError, match=r"'layers\.\*' matches no module of the student "
                       r"\(TinyCNN\).*'features'"):  # fmt: skip
        qd.distill(t, s, loss=qd.Intermediate({"features.2": "layers.*"}))
    with pytest.raises(ConfigError, match=r"matches 3 modules .* matches 1"):
        qd.distill(t, s, loss=qd.Intermediate({"features.*": "features.2"}))
    with pytest.raises(ConfigError, match="not a valid regex"):
        qd.distill(t, s, loss=qd.Intermediate({"re:(": "features.2"}))
    with pytest.raises(ConfigError, match="heads"):
        qd.Intermediate({"a": "a"}, loss="relation")
    with pytest.raises(ConfigError, match="one of"):
        qd.Intermediate({"a": "a"}, loss="l1")


# ------------------------------------------------------------------------------ hint losses
def test_mse_with_identity_mapping_equals_mse_by_hand_and_adds_to_kd():
    teacher, student = TinyCNN(8, 0), TinyCNN(8, 1)
    x, y = images(1)[0]
    run = qd.distill(teacher, student, loss=qd.Intermediate({"features.2": "features.2"}))
    loss, _ = run.step(x, y)
    expected = F.mse_loss(student.features(x), teacher.features(x))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert isinstance(run.loss.terms[0].adapters[0], nn.Identity)

    kd = qd.KD(temperature=2.0, alpha=0.7)
    run = qd.distill(teacher, student, loss=kd + qd.Intermediate(
        {"features.2": "features.2"}, loss="cosine", weight=0.3))  # fmt: skip
    loss, logits = run.step(x, y)
    cos = 1 - F.cosine_similarity(student.features(x), teacher.features(x), dim=1)
    expected = kd(student(x), teacher(x).detach(), y) + 0.3 * cos.mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.equal(logits, student(x))
    assert no_hooks(teacher) and no_hooks(student)


def test_adapter_is_a_1x1_conv_gets_gradients_and_is_stepped_by_fit(tmp_path):
    teacher, student = TinyCNN(8, 0), TinyCNN(4, 1)
    run = qd.distill(teacher, student, loss=qd.KD() + qd.Intermediate(
        {"features.2": "features.2"}, weight=1.0))  # fmt: skip
    adapter = run.loss.terms[0].adapters[0]
    assert isinstance(adapter, Adapter) and adapter.proj.weight.shape == (8, 4)
    ids = {id(p) for p in run.parameters()}
    assert all(id(p) in ids for p in adapter.parameters())
    x, y = images(1)[0]
    w, b = adapter.proj.weight, adapter.proj.bias
    by_hand = F.mse_loss(F.conv2d(student.features(x), w[:, :, None, None], b),
                         teacher.features(x))  # fmt: skip
    with pytest.raises(qd.QDistillError, match="no tensor output"):
        run.loss.terms[0]()  # nothing captured before a forward pass
    run.step(x, y)
    assert run.loss.terms[0]().item() == pytest.approx(by_hand.item(), rel=1e-6)
    run.step(x, y)[0].backward()
    assert adapter.proj.weight.grad is not None and adapter.proj.weight.grad.abs().sum() > 0
    before = adapter.proj.weight.detach().clone()
    qd.fit(run, images(), epochs=1, lr=1e-2, progress=False)
    assert not torch.equal(before, adapter.proj.weight)
    # the saved student has exactly the keys of an untouched student: no adapter, no hook
    qd.save(student, tmp_path / "s.qd.safetensors")
    qd.save(TinyCNN(4, 2), tmp_path / "ref.qd.safetensors")
    with safe_open(tmp_path / "s.qd.safetensors", "pt") as f, \
            safe_open(tmp_path / "ref.qd.safetensors", "pt") as g:  # fmt: skip
        assert set(f.keys()) == set(g.keys())
        assert not any("adapter" in k or "proj" in k for k in f.keys())
    assert set(student.state_dict()) == set(TinyCNN(4, 2).state_dict())
    assert no_hooks(student) and no_hooks(teacher)


def test_padded_positions_do_not_contribute_to_hidden_losses():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 6, generator=g), torch.randn(2, 5, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    real = mask.bool()
    assert hidden_mse(s, t, mask).item() == pytest.approx(F.mse_loss(s[real], t[real]).item())
    cos = 1 - F.cosine_similarity(s[real], t[real], dim=-1)
    assert hidden_cosine(s, t, mask).item() == pytest.approx(cos.mean().item(), rel=1e-6)
    s2, t2 = s.clone(), t.clone()
    s2[1, 3:] += 100.0
    t2[1, 4] = -7.0
    for fn in (hidden_mse, hidden_cosine):
        assert fn(s2, t2, mask).item() == pytest.approx(fn(s, t, mask).item(), rel=1e-6)
    with pytest.raises(qd.DataError, match="padding mask"):
        hidden_mse(s, t, mask[:, :4])


def test_attention_map_losses_by_hand_and_padding():
    g = torch.Generator().manual_seed(0)
    s = torch.softmax(torch.randn(2, 3, 4, 4, generator=g), -1)
    t = torch.softmax(torch.randn(2, 3, 4, 4, generator=g), -1)
    assert attention_mse(s, t).item() == pytest.approx(F.mse_loss(s, t).item())
    kl = F.kl_div(s.log(), t.log(), reduction="none", log_target=True).sum(-1).mean()
    assert attention_kl(s, t).item() == pytest.approx(kl.item(), rel=1e-5)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    s2 = s.clone()
    s2[1, :, 2:, :] = 0.5  # padded query rows
    s2[1, :, :, 2:] = 0.25  # padded key columns
    for fn in (attention_mse, attention_kl):
        assert fn(s2, t, mask).item() == pytest.approx(fn(s, t, mask).item(), rel=1e-6)
    # different head counts: compared after averaging over heads
    assert attention_mse(s[:, :1], t, None).item() == pytest.approx(
        F.mse_loss(s[:, :1], t.mean(1, keepdim=True)).item())  # fmt: skip


# ------------------------------------------------------------------------------ transformers
@pytest.fixture
def transformers():
    return pytest.importorskip("transformers")


def tiny_llama(seed, **kw):
    import transformers
    from tiny_transformers import llama_config

    torch.manual_seed(seed)
    config = llama_config(transformers, vocab_size=V, **kw)
    config._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(config).eval()


def batches(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, V, (2, 6 + i), generator=g)
        mask = torch.ones_like(ids)
        mask[1, -2:] = 0  # padded tail
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


SMALL = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1)


def test_hooks_on_hf_layers_take_the_hidden_state_and_attention_weights(transformers):
    model = tiny_llama(0)
    b = batches(1)[0]
    with FeatureCapture(model, ["model.layers.0", "model.layers.1"]) as hid, \
            FeatureCapture(model, ["model.layers.1.self_attn"], index=1) as att:  # fmt: skip
        out = model(**b, output_hidden_states=True, output_attentions=True)
    assert torch.allclose(hid["model.layers.0"], out.hidden_states[1])
    assert torch.allclose(att["model.layers.1.self_attn"], out.attentions[1])
    assert no_hooks(model)
    from tiny_transformers import bert_config  # BERT layers: another output convention

    bert = transformers.BertModel(bert_config(transformers, vocab_size=V)).eval()
    with FeatureCapture(bert, match_modules(bert, "encoder.layer.*")) as hid:
        out = bert(**b, output_hidden_states=True)
    assert torch.allclose(hid["encoder.layer.0"], out.hidden_states[1])
    assert torch.allclose(hid["encoder.layer.1"], out.last_hidden_state)


def test_relation_term_reuses_the_minilm_relation_loss(transformers):
    teacher, student = tiny_llama(0), tiny_llama(1, **SMALL)
    roles = [f"model.layers.1.self_attn.{r}_proj" for r in "qkv"]
    run = qd.distill(teacher, student, loss=qd.Intermediate(
        list(zip(roles, roles, strict=True)), loss="relation", heads=2))  # fmt: skip
    b = batches(1)[0]
    loss, _ = run.step(b, split_batch(b)[1])
    caps = QKVCapture(student, 1), QKVCapture(teacher, 1)
    with torch.no_grad():
        student(**b), teacher(**b)
    ref = attention_relation_loss(*caps, heads=2, mask=b["attention_mask"]) / 3
    for c in caps:
        c.close()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_padding_does_not_change_the_layer_losses_of_a_batch(transformers):
    teacher, student = tiny_llama(0), tiny_llama(1, **SMALL)
    layers = {"model.layers.*": "model.layers.*"}
    loss = (qd.Intermediate(layers) + qd.Intermediate(layers, loss="cosine")
            + qd.Intermediate({"model.layers.*.self_attn": "model.layers.*.self_attn"},
                              loss="attention_kl"))  # fmt: skip
    run = qd.distill(teacher, student, loss=loss)
    b = batches(1)[0]
    changed = dict(b, input_ids=b["input_ids"].clone())
    changed["input_ids"][1, -2:] = (changed["input_ids"][1, -2:] + 3) % V  # padded tokens
    first = run.step(b, None)[0]
    assert run.step(changed, None)[0].item() == pytest.approx(first.item(), rel=1e-6)
    unmasked = {"input_ids": b["input_ids"]}
    assert run.step(unmasked, None)[0].item() != pytest.approx(first.item(), rel=1e-3)


def test_hint_training_moves_student_hidden_states_toward_the_teacher(transformers):
    teacher, student = tiny_llama(0), tiny_llama(1, **SMALL)
    run = qd.distill(teacher, student, loss=qd.Intermediate({"model.norm": "model.norm"}))
    data = batches()
    before = [run.step(b, None)[0].item() for b in data]
    qd.fit(run, data, epochs=5, lr=1e-2, progress=False)
    after = [run.step(b, None)[0].item() for b in data]
    assert sum(after) < 0.5 * sum(before)


def test_llama_of_different_widths_distils_end_to_end_through_distill_and_fit(
    transformers, tmp_path
):
    teacher = tiny_llama(0)
    student = qd.quantize_(tiny_llama(1, **SMALL), qd.QuantConfig(weights=qd.int4(group_size=16)))
    loss = qd.ForwardKL() + qd.Intermediate(
        {"re:model\\.layers\\.\\d+": "re:model\\.layers\\.\\d+"}, weight=0.5
    )
    run = qd.distill(teacher, student, loss=loss)
    adapters = run.loss.terms[0].adapters
    assert [tuple(a.proj.weight.shape) for a in adapters] == [(32, 16), (32, 16)]
    data = batches()
    before = [run.step(b, split_batch(b)[1])[0].item() for b in data]
    start = [a.proj.weight.detach().clone() for a in adapters]
    qd.fit(run, data, epochs=4, lr=1e-2, progress=False, val_loader=data)
    after = [run.step(b, split_batch(b)[1])[0].item() for b in data]
    assert sum(after) < sum(before)
    assert all(not torch.equal(w, a.proj.weight) for w, a in zip(start, adapters, strict=True))
    path = qd.save(student, tmp_path / "lm.qd.safetensors")
    with safe_open(path, "pt") as f:
        assert not any("adapter" in k for k in f.keys())
    assert no_hooks(student) and no_hooks(teacher)
    copy.deepcopy(student)  # no hook closures left to copy


def test_resuming_restores_the_adapters_and_matches_an_uninterrupted_run(tmp_path):
    def run_for(ckpt, epochs, resume=False):
        student = TinyCNN(4, 1)
        run = qd.distill(TinyCNN(8, 0), student, loss=qd.KD() + qd.Intermediate(
            {"features.2": "features.2"}))  # fmt: skip
        qd.fit(run, images(), epochs=epochs, lr=1e-2, progress=False, checkpoint_dir=ckpt,
               resume=resume)  # fmt: skip
        return student, run.loss.terms[0].adapters[0]

    full_student, full_adapter = run_for(tmp_path / "a", 2)
    run_for(tmp_path / "b", 1)
    student, adapter = run_for(tmp_path / "b", 2, resume=True)
    assert torch.equal(adapter.proj.weight, full_adapter.proj.weight)
    for (k, v), w in zip(student.state_dict().items(), full_student.state_dict().values(),
                         strict=True):  # fmt: skip
        assert torch.equal(v, w), k


def test_the_readme_example_runs_and_the_loss_is_the_weighted_sum(transformers):
    teacher, student = tiny_llama(0, num_hidden_layers=4), tiny_llama(1, **SMALL)
    hint = qd.Intermediate({"model.layers.*": "model.layers.*"}, loss="mse", weight=0.5)
    with pytest.raises(ConfigError, match="matches 4 modules"):
        qd.distill(teacher, student, loss=qd.ForwardKL() + hint)
    hint = qd.Intermediate({"re:model\\.layers\\.(1|3)": "model.layers.*"}, weight=0.5)
    att = qd.Intermediate(
        {"re:model\\.layers\\.(1|3)\\.self_attn": "model.layers.*.self_attn"}, loss="attention_kl"
    )
    kl = qd.ForwardKL()
    run = qd.distill(teacher, student, loss=kl + hint + att)
    b = batches(1)[0]
    total, logits = run.step(b, split_batch(b)[1])
    with torch.no_grad():
        t_logits = teacher(**b).logits
    expected = kl(logits, t_logits, split_batch(b)[1], mask=b["attention_mask"])
    expected = expected + 0.5 * hint(b["attention_mask"]) + att(b["attention_mask"])
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert repr(run.loss).startswith("ForwardKL(") and "attention_kl" in repr(run.loss)


def test_attention_terms_on_sdpa_models_ask_for_eager_attention(transformers):
    from tiny_transformers import llama_config

    torch.manual_seed(0)
    config = llama_config(transformers, vocab_size=V)
    config._attn_implementation = "sdpa"
    teacher = transformers.LlamaForCausalLM(config).eval()
    student = copy.deepcopy(teacher)
    pairs = {"model.layers.0.self_attn": "model.layers.0.self_attn"}
    run = qd.distill(teacher, student, loss=qd.Intermediate(pairs, loss="attention_mse"))
    with pytest.raises(qd.QDistillError, match="attn_implementation='eager'"):
        run.step(batches(1)[0], None)
