"""BitDistill on sound footing: wordnet-10, mean pooling, stage 2 by hidden-state distillation,
SubLN's plain init, and bad input rejected before anything is trained or written."""

import copy
from pathlib import Path

import pytest
import torch

from qdistill.data.text import TokenBatches
from qdistill.data.wordnet import CATEGORIES, general_text, load_wordnet, read_glosses
from qdistill.errors import ConfigError, DataError, QDistillError
from qdistill.models.subln import SubLN
from qdistill.recipes.bitdistill import (
    BitDistillConfig,
    bitdistill,
    continual_pretrain,
    hidden_distill_loss,
)

transformers = pytest.importorskip("transformers")
from tiny_transformers import bert_config, llama_config  # noqa: E402

from qdistill.models.hf import HFClassifier, backbone, classifier_from_config  # noqa: E402

VOCAB = 64


def tiny_bert(seed=0, labels=2, pooling="model", **kw):
    torch.manual_seed(seed)
    cfg = bert_config(
        transformers,
        vocab_size=kw.pop("vocab_size", VOCAB),
        num_labels=labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **kw,
    )
    return classifier_from_config(cfg, pooling).eval()


def batches(n=32, length=10, labels=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[: n // 2, -3:] = 0
    y = (ids[:, 1] % 2) if labels else None
    data = TokenBatches(ids, mask, y)
    return torch.utils.data.DataLoader(data, batch_size=8)


# --- wordnet-10 -------------------------------------------------------------------------------

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n"


def write_wordnet(root: Path, per_cat: int = 12) -> None:
    root.mkdir()
    lines = [HEADER]
    offset = 100
    for num in (5, 6, 13, 7):  # animal, artifact, food, attribute (not a task category here)
        for i in range(per_cat):
            lines.append(
                f"{offset:08d} {num:02d} n 01 word{i} 0 000 | gloss {num} number {i}; "
                f'"an example {i}"  \n'
            )
            offset += 1
    lines.append(f"{offset:08d} 05 n 01 dup 0 000 | shared gloss  \n")
    lines.append(f"{offset + 1:08d} 06 n 01 dup 0 000 | shared gloss  \n")
    (root / "data.noun").write_text("".join(lines))
    (root / "data.verb").write_text(HEADER + "00000001 29 v 01 run 0 000 | move fast  \n")


def test_wordnet_glosses_are_parsed_from_data_files(tmp_path):
    write_wordnet(tmp_path / "wn", per_cat=2)
    glosses = read_glosses(tmp_path / "wn" / "data.noun")
    assert glosses[0] == (5, "gloss 5 number 0")  # example after '; "' dropped, header skipped
    assert read_glosses(tmp_path / "wn" / "data.noun", definition_only=False)[0] == (
        5,
        'gloss 5 number 0; "an example 0"',
    )


def test_wordnet_split_is_balanced_seeded_disjoint_and_drops_shared_glosses(tmp_path):
    root = tmp_path / "wn"
    write_wordnet(root)
    cats = ("noun.animal", "noun.artifact", "noun.food")
    kw = dict(categories=cats, root=root, test_per_class=4)
    train, test = load_wordnet("train", **kw), load_wordnet("test", **kw)
    assert [test.labels.count(i) for i in range(3)] == [4, 4, 4]  # balanced
    assert [train.labels.count(i) for i in range(3)] == [8, 8, 8]
    assert not set(train.texts) & set(test.texts)
    assert "shared gloss" not in train.texts + test.texts  # two categories: no single label
    pairs = zip(train.texts, train.labels, strict=True)
    assert all(t.startswith(f"gloss {(5, 6, 13)[y]} ") for t, y in pairs)
    assert train.classes == ("animal", "artifact", "food")
    assert load_wordnet("train", **kw) == train
    assert load_wordnet("train", seed=1, **kw).texts != train.texts
    small = load_wordnet("train", per_class=3, **kw)
    assert [small.labels.count(i) for i in range(3)] == [3, 3, 3]
    general = general_text(exclude=cats, root=root)
    assert "move fast" in general and any(g.startswith("gloss 7 ") for g in general)
    assert not any(g.startswith(("gloss 5 ", "gloss 6 ", "gloss 13 ")) for g in general)
    with pytest.raises(DataError, match="test_per_class"):
        load_wordnet(categories=cats, root=root, test_per_class=12)
    with pytest.raises(DataError, match="noun.nonsense"):
        load_wordnet(categories=("noun.nonsense",), root=root)
    with pytest.raises(DataError, match="apt-get install wordnet-base"):
        load_wordnet(root=tmp_path / "missing")


@pytest.mark.skipif(
    not Path("/usr/share/wordnet/data.noun").exists(),
    reason="Debian package wordnet-base not installed (make data installs it)",
)
def test_the_real_wordnet_10():
    train, test = load_wordnet("train"), load_wordnet("test")
    assert len(train.classes) == 10 == len(CATEGORIES)
    assert [test.labels.count(i) for i in range(10)] == [200] * 10
    assert min(train.labels.count(i) for i in range(10)) > 1500
    assert not set(train.texts) & set(test.texts)


# --- mean pooling -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_mean_pooling_feeds_the_head_the_masked_mean_of_the_last_hidden_states(kind):
    torch.manual_seed(0)
    if kind == "bert":
        cfg = bert_config(transformers, vocab_size=VOCAB, num_labels=3, hidden_dropout_prob=0.0)
    else:
        cfg = llama_config(transformers, vocab_size=VOCAB, num_labels=3, pad_token_id=0)
    model = classifier_from_config(cfg, pooling="mean").eval()
    x, _ = next(iter(batches()))
    hidden = backbone(model)(**x)[0]
    m = x["attention_mask"].float()
    manual = [hidden[i][m[i].bool()].mean(0) for i in range(len(m))]  # real tokens only
    head = model.hf.classifier if kind == "bert" else model.hf.score
    expected = head(torch.stack(manual))
    assert torch.allclose(model(x), expected, atol=1e-5)
    if kind == "bert":
        assert backbone(model).pooler is None  # unused, not shipped
    with pytest.raises(ConfigError, match="pooling"):
        HFClassifier(model.hf, pooling="max")


def test_default_pooling_follows_the_sentence_transformers_config(tmp_path):
    from qdistill.models.hf import default_pooling

    assert default_pooling(str(tmp_path)) == "model"
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    assert default_pooling(str(tmp_path)) == "mean"


# --- stage 2 for encoders: hidden-state distillation ------------------------------------------


def test_hidden_distill_loss_matches_the_closed_form():
    torch.manual_seed(0)
    t = [torch.randn(2, 3, 4) for _ in range(3)]
    s = [x + 0.1 * torch.randn_like(x) for x in t]
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    keep = mask.bool()
    expected = (
        sum(((s[i][keep] - t[i][keep]) ** 2).sum() / (t[i][keep] ** 2).sum() for i in (1, 2)) / 2
    )
    assert float(hidden_distill_loss(tuple(s), tuple(t), mask)) == pytest.approx(float(expected))
    assert float(hidden_distill_loss(tuple(t), tuple(t), mask)) == 0.0


def test_stage_2_brings_the_ternary_encoder_back_towards_the_pretrained_one():
    from qdistill.models.hf import bitnet_config
    from qdistill.quant import quantize_

    reference = tiny_bert(pooling="mean")
    student = copy.deepcopy(reference)
    quantize_(student, bitnet_config(student))
    text = [b for b, _ in batches(64, labels=True, seed=3)]

    def gap():
        with torch.no_grad():
            x = text[0]
            a = backbone(student)(**x, output_hidden_states=True).hidden_states
            b = backbone(reference)(**x, output_hidden_states=True).hidden_states
            return float(hidden_distill_loss(a, b, x["attention_mask"]))

    before = gap()
    report = continual_pretrain(
        student, text, tokens=3000, lr=1e-3, reference=reference, progress=False, seed=0
    )
    assert report["tokens"] >= 3000 and report["loss_last"] < report["loss_first"]
    assert gap() < 0.7 * before
    assert all(p.grad is None for p in reference.parameters())  # the reference is not trained


def test_encoders_distil_hidden_states_in_stage_2_and_decoders_keep_next_token():
    from qdistill.recipes.bitdistill import stage2_mode

    assert stage2_mode(tiny_bert(), BitDistillConfig()) == "hidden"
    assert stage2_mode(tiny_bert(), BitDistillConfig(stage2="lm")) == "lm"
    assert stage2_mode(tiny_bert(), BitDistillConfig(pretrain_tokens=0)) == "skip"
    torch.manual_seed(0)
    llama = classifier_from_config(llama_config(transformers, vocab_size=VOCAB, pad_token_id=0))
    assert stage2_mode(llama, BitDistillConfig()) == "lm"
    with pytest.raises(ConfigError, match="stage2"):
        BitDistillConfig(stage2="mlm")


def test_plain_subln_starts_at_gain_one_and_bias_zero():
    train = batches()
    student, report = bitdistill(
        tiny_bert(),
        train,
        config=BitDistillConfig(
            subln_init="plain", pretrain_tokens=0, distill=False, epochs=1, lr=0.0, progress=False
        ),
    )
    subs = [m for m in student.modules() if isinstance(m, SubLN)]
    assert len(subs) == 4 and all(m.gate is None for m in subs)
    for m in subs:  # lr 0: what stage 1 put there
        assert torch.equal(m.norm.weight, torch.ones_like(m.norm.weight))
        assert torch.equal(m.norm.bias, torch.zeros_like(m.norm.bias))


# --- bad input: one clear error, nothing written -----------------------------------------------


def _run(tmp_path, student, teacher, text, **kw):
    config = BitDistillConfig(
        pretrain_tokens=100, epochs=1, progress=False, checkpoint_dir=tmp_path / "ck", **kw
    )
    return bitdistill(student, batches(), teacher=teacher, text_loader=text, config=config)


@pytest.mark.parametrize(
    "teacher_kw, match",
    [
        (dict(vocab_size=VOCAB + 8), "different vocabularies"),
        (dict(labels=3), "different label counts"),
    ],
)
def test_teacher_and_student_must_share_vocabulary_and_labels(tmp_path, teacher_kw, match):
    text = [b for b, _ in batches()]
    with pytest.raises(ConfigError, match=match):
        _run(tmp_path, tiny_bert(), tiny_bert(**teacher_kw), text)
    assert not (tmp_path / "ck").exists()


def test_empty_stage_2_corpus_is_an_error_before_anything_runs(tmp_path):
    student = tiny_bert()
    before = copy.deepcopy(student.state_dict())
    with pytest.raises(ConfigError, match="empty"):
        _run(tmp_path, student, tiny_bert(), [])
    assert not (tmp_path / "ck").exists()
    assert not any(isinstance(m, SubLN) for m in student.modules())  # stage 1 did not run
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())


def test_a_model_without_attention_projections_names_the_patterns_tried(tmp_path):
    student, teacher = tiny_bert(), tiny_bert()
    for model in (student, teacher):  # rename the Q/K/V projections out of reach
        for layer in model.hf.bert.encoder.layer:
            att = layer.attention.self
            att.q_lin, att.k_lin, att.v_lin = att.query, att.key, att.value
            del att.query, att.key, att.value
    with pytest.raises(QDistillError, match=r"encoder\.layer\.1\.attention\.self\.query.*q_proj"):
        _run(tmp_path, student, teacher, [b for b, _ in batches()], stage2="lm", mask_token_id=3)
    assert not (tmp_path / "ck").exists()


def test_grouped_query_attention_relations_use_the_key_value_head_count():
    from qdistill.distill.bitdistill import BitDistiller, BitDistillLoss, relation_heads

    torch.manual_seed(0)  # 6 query heads, 2 key/value heads of width 8: K, V are 16 wide
    cfg = llama_config(
        transformers,
        hidden_size=48,
        num_attention_heads=6,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        pad_token_id=0,
    )
    teacher, student = classifier_from_config(cfg), classifier_from_config(cfg)
    assert relation_heads(cfg) == 2
    run = BitDistiller(teacher, student, BitDistillLoss(gamma=1.0))
    x, y = next(iter(batches()))
    loss, _ = run.step(x, y)  # 6 relation heads would not split the 16-wide K and V
    assert torch.isfinite(loss) and run.last_parts["ad"] > 0
    run.close()
