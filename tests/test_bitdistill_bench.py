"""The BitDistill benchmark's stage-2 sharing: which variants may start stage 3 from one
stage-2 checkpoint (benchmarks/bitdistill.py, loaded from its path: not a package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from qdistill.recipes.bitdistill import BitDistillConfig

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bitdistill.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_bitdistill", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _key(bench, name, per_seed=True, seed=0, **over):
    spec = {"pretrain_tokens": 30_000, "seed": seed, **bench.VARIANTS[name], **over}
    return bench.stage2_key(BitDistillConfig(**spec), per_seed=per_seed)


def test_stage_3_ablations_share_bitdistills_stage_2_and_nothing_else_does(bench):
    full = _key(bench, "bitdistill")
    assert _key(bench, "bitdistill-no-logits-kd") == full
    assert _key(bench, "bitdistill-no-attention") == full
    others = {
        _key(bench, "bitdistill-no-subln"),
        _key(bench, "bitdistill-subln-plain"),
        _key(bench, "bitdistill", seed=1),
        _key(bench, "bitdistill", pretrain_tokens=3_000),
        _key(bench, "bitdistill", pretrain_lr=5e-4),
        full,
    }
    assert len(others) == 6  # each changes what stage 2 computes: its own checkpoint
    assert _key(bench, "bitdistill-no-stage2") is None
    assert _key(bench, "bitnet-sft") is None


def test_shared_stage_2_drops_only_the_seed(bench):
    shared = _key(bench, "bitdistill", per_seed=False)
    assert shared == _key(bench, "bitdistill", per_seed=False, seed=2)
    assert shared != _key(bench, "bitdistill-no-subln", per_seed=False)
    assert shared != _key(bench, "bitdistill", per_seed=True)


# --- bad input on the CLI: a recipe whose stage-2 corpus is empty -------------------------------


def test_recipe_with_an_empty_stage_2_corpus_exits_2_in_one_line_and_writes_nothing(
    tmp_path, capsys
):
    """Fortune files holding only the task's topics leave stage 2 no general text: the CLI
    names the problem in one line (exit 2) before the teacher is trained or a file written."""
    transformers = pytest.importorskip("transformers")
    from tiny_transformers import bert_config

    from qdistill.cli import main
    from qdistill.data.fortunes import TOPICS
    from qdistill.models.hf import classifier_from_config

    words = [f"w{t}{i}" for t in range(len(TOPICS)) for i in range(4)]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    try:
        tok = transformers.BertTokenizer(vocab=str(vocab))  # transformers 5
    except TypeError:
        tok = transformers.BertTokenizer(vocab_file=str(vocab))  # transformers 4
    model_dir = tmp_path / "tiny-bert"
    cfg = bert_config(transformers, vocab_size=len(words) + 5, num_labels=len(TOPICS))
    classifier_from_config(cfg).hf.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    root = tmp_path / "fortunes"
    root.mkdir()
    for t, name in enumerate(TOPICS):  # the task's topics only: nothing left for stage 2
        lines = [f"w{t}{i % 4} w{t}{(i + 1) % 4} n{i}" for i in range(30)]
        (root / name).write_text("\n%\n".join(lines) + "\n")
        (root / f"{name}.dat").write_bytes(b"\0")
    recipe = tmp_path / "bd.yaml"
    recipe.write_text(
        f"recipe: bitdistill\nmodel: {model_dir}\ndata_dir: {root}\noutput: {tmp_path / 'out'}\n"
        "max_length: 8\nbatch_size: 16\nbitdistill: {pretrain_tokens: 300, epochs: 1}\n"
    )
    capsys.readouterr()
    assert main(["run", str(recipe), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "no fortune categories" in err and "beyond" in err
    assert not (tmp_path / "out").exists()
