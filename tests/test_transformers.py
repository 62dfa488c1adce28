"""Transformer building blocks for BitNet Distillation on tiny random BERT and Llama models."""

import copy

import pytest
import torch

import qdistill as qd
from qdistill.distill.attention import QKVCapture, attention_relation_loss, relation_kl
from qdistill.models.subln import SubLN, insert_subln

transformers = pytest.importorskip("transformers")
from tiny_transformers import bert_config, llama_config  # noqa: E402


def tiny_bert(hidden=32, seed=0):
    torch.manual_seed(seed)
    cfg = bert_config(transformers, hidden, vocab_size=100)
    return transformers.BertModel(cfg).eval()


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = llama_config(transformers, vocab_size=100)
    return transformers.LlamaForCausalLM(cfg).eval()


IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))


def test_subln_wraps_exactly_the_two_projections_of_every_bert_block():
    model = tiny_bert()
    before = {n for n, _ in model.named_modules()}
    wrapped = insert_subln(model)
    assert wrapped == [
        "encoder.layer.0.attention.output.dense",
        "encoder.layer.0.output.dense",
        "encoder.layer.1.attention.output.dense",
        "encoder.layer.1.output.dense",
    ]
    after = {n for n, _ in model.named_modules()}
    added = {n for n in after - before}
    assert added == {f"{w}.{c}" for w in wrapped for c in ("norm", "linear")}
    assert all(isinstance(model.get_submodule(w), SubLN) for w in wrapped)


@pytest.mark.parametrize("factory", [tiny_bert, tiny_llama])
def test_identity_init_keeps_outputs_and_full_subln_changes_them(factory):
    reference = factory()

    def out(m):
        result = m(IDS)
        return (
            getattr(result, "last_hidden_state", None)
            if hasattr(result, "last_hidden_state")
            else result.logits
        )

    with torch.no_grad():
        expected = out(reference)
        gated = copy.deepcopy(reference)
        insert_subln(gated, identity_init=True)
        assert torch.equal(out(gated), expected)
        full = copy.deepcopy(reference)
        names = insert_subln(full)
        assert not torch.allclose(out(full), expected)
    if factory is tiny_llama:
        assert names[0] == "model.layers.0.self_attn.o_proj"
        assert isinstance(full.get_submodule(names[0]).norm, torch.nn.RMSNorm)


def test_attention_relation_loss_zero_for_identical_positive_otherwise():
    teacher = tiny_bert(hidden=32, seed=0)
    same = copy.deepcopy(teacher)
    other = tiny_bert(hidden=16, seed=1)  # different width: relations split to 4 common heads
    t = QKVCapture(teacher, layer=1)
    with torch.no_grad():
        teacher(IDS)
        s = QKVCapture(same, layer=1)
        same(IDS)
        assert float(attention_relation_loss(s, t, heads=4)) == pytest.approx(0.0, abs=1e-6)
        o = QKVCapture(other, layer=1)
        other(IDS)
        # random-init weights give near-uniform relations: small, but clearly not zero
        assert float(attention_relation_loss(o, t, heads=4)) > 1e-5
    assert t.outputs["q"].shape == (2, 7, 32) and o.outputs["q"].shape == (2, 7, 16)
    for c in (t, s, o):
        c.close()


def test_relation_kl_by_hand_and_masking():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # one head of width 2, two tokens
    y = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    p = torch.softmax(x @ x.transpose(1, 2) / 2**0.5, -1)
    q = torch.softmax(y @ y.transpose(1, 2) / 2**0.5, -1)
    expected = (p * (p / q).log()).sum(-1).mean()
    assert torch.allclose(relation_kl(y, x, heads=1), expected)
    mask = torch.tensor([[1, 0]])
    assert float(relation_kl(y, x, heads=1, mask=mask)) == pytest.approx(0.0, abs=1e-7)


def test_bitlinear_w158a8_on_a_llama_and_packed_round_trip(tmp_path):
    model = tiny_llama()
    cfg = qd.QuantConfig(
        weights=qd.TernaryFormat(axis=0),
        activations=qd.IntFormat(8, axis="row"),
        rules={"lm_head": None},
        unsupported="ignore",
    )
    qd.quantize_(model, cfg)
    assert "lm_head" in model.qd_plan.kept and len(model.qd_plan.quantized) == 2 * 7
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    w = layer.quantized_weight().detach()
    ratio = w / layer.weight_qtensor().scale.reshape(-1, 1)
    assert set(torch.unique(ratio.round()).tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.allclose(ratio, ratio.round(), atol=1e-5)
    model.train()
    model(IDS, labels=IDS).loss.backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    model.eval()
    path = qd.save(model, tmp_path / "llama.qd.safetensors")
    loaded = qd.load(path, model=tiny_llama(seed=5))
    with torch.no_grad():
        a, b = model(IDS).logits, loaded(IDS).logits
    assert torch.allclose(a, b, atol=1e-3 * float(a.abs().max()))


def test_matched_subln_takes_its_input_statistics_and_stays_closer_to_the_model():
    from qdistill.models.subln import match_subln_scale

    reference = tiny_bert()
    inputs = {}
    target = reference.encoder.layer[1].output.dense
    hook = target.register_forward_pre_hook(lambda m, a: inputs.setdefault("x", a[0]))
    with torch.no_grad():
        expected = reference(IDS).last_hidden_state
    hook.remove()
    plain, matched = copy.deepcopy(reference), copy.deepcopy(reference)
    insert_subln(plain)
    insert_subln(matched)
    assert match_subln_scale(matched, [IDS]) == 4
    norm = matched.encoder.layer[1].output.dense.norm
    x = inputs["x"].reshape(-1, inputs["x"].shape[-1]).double()
    z = torch.nn.functional.layer_norm(x, x.shape[-1:], eps=norm.eps)
    for c in (0, 5, x.shape[-1] - 1):  # per channel: least squares x_c ~ g z_c + b
        design = torch.stack([z[:, c], torch.ones_like(z[:, c])], dim=1)
        g, b = torch.linalg.lstsq(design, x[:, c : c + 1]).solution.flatten()
        assert float(norm.weight[c]) == pytest.approx(float(g), rel=1e-4, abs=1e-6)
        assert float(norm.bias[c]) == pytest.approx(float(b), rel=1e-4, abs=1e-6)
    assert not any(m.bypass for m in matched.modules() if isinstance(m, SubLN))
    with torch.no_grad():
        err_plain = (plain(IDS).last_hidden_state - expected).abs().mean()
        err_matched = (matched(IDS).last_hidden_state - expected).abs().mean()
    assert err_matched < 0.2 * err_plain
