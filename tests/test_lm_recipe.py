"""The ``lm-kd`` YAML recipe end to end on a tiny random Llama, and its bad inputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from tiny_transformers import llama_config

from qdistill.cli import main
from qdistill.errors import ConfigError, QDistillError
from qdistill.recipes.from_yaml import load_recipe, run_recipe

transformers = pytest.importorskip("transformers")

WORDS = "the a cat dog sat on mat ran fast slow big small red blue and or it was".split()
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]


def _tiny_model(folder: Path, vocab: int = 32, seed: int = 0) -> Path:
    """A random two-layer Llama and a word-level tokenizer of ``WORDS`` saved to ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(seed)
    config = llama_config(
        transformers, vocab_size=vocab, pad_token_id=0, bos_token_id=2, eos_token_id=3
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    vocab_map = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab_map, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(folder)
    return folder


def _text(path: Path, n: int = 24) -> Path:
    """``n`` paragraphs of random words separated by blank lines."""
    g = torch.Generator().manual_seed(1)
    paras = [
        " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (12,), generator=g))
        for _ in range(n)
    ]
    path.write_text("\n\n".join(paras) + "\n")
    return path


def _recipe(tmp_path: Path, **overrides) -> Path:
    teacher = tmp_path / "teacher"
    if not teacher.exists():
        _tiny_model(teacher)
    spec = {
        "recipe": "lm-kd",
        "teacher": str(teacher),
        "output": "out",
        "batch_size": 4,
        "text": {"source": str(_text(tmp_path / "text.txt")), "held_out": 0.25, "max_length": 16},
        "quant": {
            "weights": {"kind": "int", "bits": 4, "group_size": 16},
            "rules": {"lm_head": None},
        },
        "distill": {
            "loss": "forward_kl",
            "layers": [{"teacher": "model.layers.*", "student": "model.layers.*", "weight": 0.5}],
        },
        "train": {"epochs": 2, "lr": 1e-3},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    path = tmp_path / "lm-kd.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_lm_kd_recipe_end_to_end_reloads_through_auto_model(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    assert main(["run", str(recipe), "--no-progress"]) == 0
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    # 24 paragraphs, a quarter held out (the same as held_out: 6)
    assert metrics["held_out_texts"] == 6 and metrics["train_texts"] == 18
    assert len(metrics["train_loss"]) == 2 and all(v == v for v in metrics["train_loss"])
    for key in ("teacher_perplexity", "student_perplexity", "student_perplexity_before"):
        assert 1.0 < metrics[key] < 1e4
    assert 0.0 <= metrics["greedy_agreement"] <= 1.0

    # the folder reloads the Hugging Face way as the packed model, with the packed file's logits
    import qdistill as qd

    folder = out / "student"
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "qdistill"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    packed = qd.load(out / "student.qd.safetensors").eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)  # the tokenizer travels too
    batch = tok(["the cat sat on the mat", "a big red dog ran fast"], return_tensors="pt")
    with torch.no_grad():
        a = reloaded(**batch).logits
        b = packed(**batch).logits
    assert torch.equal(a, b)
    # and these are the quantized weights (not the teacher's float weights)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "teacher").eval()
    with torch.no_grad():
        assert not torch.allclose(a, teacher(**batch).logits, atol=1e-4)
    assert "q_proj" in str(config["quantization_config"]["layers"])


def test_student_perplexity_is_the_reloaded_folders(tmp_path):
    """Token-weighted perplexity of the saved folder, by hand with torch's cross-entropy."""
    recipe = _recipe(tmp_path, distill={"layers": []}, train={"epochs": 1})
    config = load_recipe(recipe)
    metrics = run_recipe(config, progress=False)
    _, held_out = config.texts()
    folder = Path(metrics["student_folder"])
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in held_out:
            ids = tok(text, return_tensors="pt", truncation=True, max_length=16)["input_ids"]
            logits = model(input_ids=ids).logits[0, :-1]
            nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    assert metrics["student_perplexity"] == pytest.approx(
        float(torch.tensor(nll / count).exp()), rel=1e-4
    )


def test_on_nonfinite_reaches_fit_from_the_recipe(tmp_path, capsys):
    """lr 1e30 makes the loss non-finite: 'stop' exits 2 naming the step (no student written);
    the parse refuses a policy fit does not know."""
    recipe = _recipe(tmp_path, train={"lr": 1e30, "epochs": 3}, distill={"layers": []})
    assert main(["run", str(recipe), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "lm-kd: the loss is" in err and "pass on_nonfinite='skip'" in err
    assert not (tmp_path / "out" / "student").exists()
    assert not (tmp_path / "out" / "metrics.json").exists()
    bad = _recipe(tmp_path, train={"on_nonfinite": "ignore"})
    with pytest.raises(ConfigError, match=r"train.on_nonfinite.*'stop', 'skip'"):
        load_recipe(bad)


def test_on_nonfinite_skip_is_passed_to_fit(tmp_path, monkeypatch):
    import qdistill.train as train

    seen = {}
    real = train.fit

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "fit", spy)
    recipe = _recipe(
        tmp_path,
        train={"on_nonfinite": "skip", "epochs": 1},
        distill={"layers": [], "loss": "jsd", "beta": 0.3},
        save={"pretrained": False},
    )
    metrics = run_recipe(load_recipe(recipe), progress=False)
    assert seen["on_nonfinite"] == "skip"
    # packed file only: no folder, and the metrics come from qd.load of the file
    assert not (tmp_path / "out" / "student").exists()
    assert Path(metrics["student_file"]).is_file() and metrics["student_perplexity"] > 1
    assert metrics["loss"] == "GeneralizedJSD(beta=0.3, alpha=1)"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"distill": {"loss": "kl"}}, r"distill.loss: 'kl' is not one of"),
        ({"distill": {"layers": [{"teacher": "model.blocks.*", "student": "model.layers.*"}]}},
         r"layer pattern 'model.blocks.\*' matches no module of the teacher"),
        ({"distill": {"layers": [{"teacher": "model.layers.*", "student": "x", "loss": "l2"}]}},
         r"distill.layers\[0\].loss: 'l2' is not one of"),
        ({"quant": {"weights": {"kind": "int", "bits": 4}, "rules": {"head": None}}}, r"head"),
        ({"teacher": "no/such/folder"}, r"teacher: 'no/such/folder' is neither"),
        ({"text": {"source": "missing.txt"}}, r"text.source: 'missing.txt' is not a file"),
        ({"text": {"held_out": 2.5}}, r"text.held_out: 2.5 is neither a fraction"),
        ({"text": {"held_out": 24}}, r"24 text\(s\) leave none to train on"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, overrides, message):
    recipe = _recipe(tmp_path, **overrides)
    capsys.readouterr()  # the fixture's own output (transformers' save progress)
    assert main(["run", str(recipe), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_mismatched_vocabularies_exit_2_nothing_written(tmp_path, capsys):
    student = _tiny_model(tmp_path / "student", vocab=40, seed=1)
    recipe = _recipe(tmp_path, student=str(student))
    capsys.readouterr()
    assert main(["run", str(recipe), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "teacher vocabulary (32 tokens) and student vocabulary (40) differ" in err
    assert not (tmp_path / "out").exists()


def test_example_recipe_parses():
    example = Path(__file__).parents[1] / "examples" / "lm-kd-smollm2.yaml"
    spec = yaml.safe_load(example.read_text())
    assert spec["recipe"] == "lm-kd" and spec["teacher"] == "smollm2"
    try:
        config = load_recipe(example)
    except QDistillError as exc:  # the offline package may be missing on a bare machine
        pytest.skip(str(exc))
    assert config.distill.loss == "forward_kl" and config.quant_config().weights is not None
