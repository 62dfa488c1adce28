"""``train.on_nonfinite`` in YAML recipes reaches ``fit`` (issue 12 item 6, through the runner)."""

from __future__ import annotations

import importlib

import pytest
import yaml

from qdistill.cli import main
from qdistill.errors import ConfigError
from qdistill.recipes.from_yaml import load_recipe, run_recipe

# the modules (qdistill.recipes re-exports a function named qat over the module attribute)
qat_mod = importlib.import_module("qdistill.recipes.qat")
learned_mod = importlib.import_module("qdistill.recipes.learned")


def _recipe(tmp_path, **train) -> str:
    spec = {
        "recipe": "qat",
        "dataset": "digits",
        "output": "out",
        "subset": 64,
        "student": {"model": "student-cnn", "kwargs": {"width": 4}},
        "quant": {"weights": {"kind": "int", "bits": 4}},
        "train": {"epochs": 2, "lr": 0.002, **train},
    }
    path = tmp_path / "qat.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _spy(monkeypatch, module) -> dict:
    seen: dict = {}
    real = module.fit

    def spy(*args, **kwargs):
        seen.setdefault("on_nonfinite", []).append(kwargs.get("on_nonfinite"))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "fit", spy)
    return seen


def test_diverging_recipe_stops_with_exit_2_and_writes_no_student(tmp_path, capsys):
    assert main(["run", _recipe(tmp_path, lr=1e30, epochs=3), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "the loss is" in err and "on_nonfinite='skip'" in err
    assert not (tmp_path / "out" / "student.qd.safetensors").exists()


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_policy_reaches_fit(tmp_path, monkeypatch, policy):
    seen = _spy(monkeypatch, qat_mod)
    run_recipe(load_recipe(_recipe(tmp_path, on_nonfinite=policy, epochs=1)), progress=False)
    assert seen["on_nonfinite"] == [policy]


def test_default_is_stop_and_unknown_policy_is_refused_at_parse(tmp_path):
    assert load_recipe(_recipe(tmp_path)).train.on_nonfinite == "stop"
    with pytest.raises(ConfigError, match=r"train.on_nonfinite: 'ignore' is not one of"):
        load_recipe(_recipe(tmp_path, on_nonfinite="ignore"))


def test_learned_points_recipe_passes_the_policy(tmp_path, monkeypatch):
    seen = _spy(monkeypatch, learned_mod)
    spec = yaml.safe_load(open(_recipe(tmp_path, on_nonfinite="skip", epochs=1)))
    spec.update(
        recipe="differentiable_quantization",
        teacher={"model": "student-cnn", "kwargs": {"width": 4}, "epochs": 1},
        learned={"bits": 2, "group_size": None},
    )
    spec.pop("quant")
    run_recipe(load_recipe_from(tmp_path, spec), progress=False)
    assert seen["on_nonfinite"] == ["skip"]


def load_recipe_from(tmp_path, spec):
    path = tmp_path / "dq.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_recipe(path)
