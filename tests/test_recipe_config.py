"""Typed recipe configs and early CLI validation (issue 12 items 4, 8, 9; issue 14 item 3):
every bad value is one line, exit 2, before any work and before anything is written."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from qdistill.cli import main
from qdistill.errors import ConfigError, QDistillError
from qdistill.recipes.bitdistill import BitDistillConfig
from qdistill.recipes.config import RECIPES, RecipeConfig, Section, limits, register_recipe
from qdistill.recipes.from_yaml import load_recipe, run_recipe
from qdistill.recipes.mixed_precision import parse_size

GOOD = """recipe: qat
dataset: digits
output: runs/out
subset: 64
student: {model: student-cnn, kwargs: {width: 4}}
quant: {weights: {kind: int, bits: 4}}
train: {epochs: 1, lr: 0.002}
"""


def one_line_exit_2(capsys, argv, *needles) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for n in needles:
        assert n in err, err
    return err


@pytest.mark.parametrize(
    "line, needle",
    [
        ("train: {epochs: three}", "train.epochs: 'three' is not an integer"),
        ("train: {epochs: 1.5}", "train.epochs: 1.5 is not an integer"),
        ("train: {epochs: true}", "train.epochs: True is not an integer"),
        ("train: {epochs: 0}", "train.epochs: 0 must be >= 1"),
        ("train: {lr: fast}", "train.lr: 'fast' is not a number"),
        ("train: {lr: -1}", "train.lr: -1.0 must be > 0"),
        ("train: {lr: .nan}", "train.lr: nan is not a finite number"),
        ("batch_size: big", "batch_size: 'big' is not an integer"),
        ("seed: abc", "seed: 'abc' is not an integer"),
        ("output: 123", "output: 123 is not a string"),
        ("distill: {temperature: 0}", "distill.temperature: 0.0 must be > 0"),
        ("calibration: {observer: best}", "calibration.observer: 'best' is not one of"),
        ("trian: {epochs: 1}", "unknown key(s) ['trian'] at the top level"),
        ("data_dir: /nonexistent/qd", "data_dir: '/nonexistent/qd' is not a folder"),
        ("dataset: bogus", "dataset: 'bogus'"),
    ],
)
def test_bad_recipe_values_exit_2_before_anything_is_created(tmp_path, capsys, line, needle):
    key = line.split(":")[0]
    text = "\n".join(ln for ln in GOOD.splitlines() if not ln.startswith(key + ":")) + "\n" + line
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text + "\n")
    one_line_exit_2(capsys, ["run", str(recipe)], needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]  # no output folder


def test_yaml_1_1_number_strings_are_read_as_numbers(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(GOOD.replace("lr: 0.002", "lr: 2e-3"))
    assert load_recipe(recipe).train.lr == 0.002


def test_output_resolves_against_the_recipe_folder_and_stays_inside(tmp_path, capsys):
    sub = tmp_path / "recipes"
    sub.mkdir()
    recipe = sub / "r.yaml"
    recipe.write_text(GOOD)
    assert load_recipe(recipe).output == str((sub / "runs" / "out").resolve())
    for outside in ("../elsewhere", str(tmp_path / "abs"), "runs/../../x"):
        recipe.write_text(GOOD.replace("output: runs/out", f"output: {outside}"))
        with pytest.raises(ConfigError, match="leaves the recipe's folder"):
            load_recipe(recipe)
        one_line_exit_2(capsys, ["run", str(recipe)], "--allow-output-outside")
    allowed = load_recipe(recipe, allow_output_outside=True)
    assert allowed.output == str((tmp_path / "x").resolve())
    (sub / "afile").write_text("")
    recipe.write_text(GOOD.replace("output: runs/out", "output: afile"))
    with pytest.raises(ConfigError, match="is an existing file"):
        load_recipe(recipe)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipes"]


def test_a_diverging_recipe_exits_non_zero_without_a_student(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    text = GOOD.replace("recipe: qat", "recipe: train").replace("0.002", "1.0e30")
    recipe.write_text(text + "batch_size: 16\n")  # 4 steps: the second sees 1e30 weights
    err = one_line_exit_2(capsys, ["run", str(recipe), "--no-progress"])
    assert "NaN" in err or "loss is" in err
    assert not (tmp_path / "runs" / "out" / "student.qd.safetensors").exists()


def test_bitdistill_section_is_typed_from_bitdistill_config_fields(tmp_path):
    base = {"recipe": "bitdistill", "model": "minilm", "output": str(tmp_path / "o")}
    for section, bad, needle in [
        ("bitdistill", {"epochs": "three"}, "bitdistill.epochs: 'three' is not an integer"),
        ("bitdistill", {"lr": "fast"}, "bitdistill.lr: 'fast' is not a number"),
        ("bitdistill", {"distill": "yes"}, "bitdistill.distill: 'yes' is not true or false"),
        ("teacher", {"lr": -1}, "teacher.lr: -1.0 must be > 0"),
        ("max_length", "long", "max_length: 'long' is not an integer"),
    ]:
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(".", r"\.")):
            RECIPES["bitdistill"].from_dict({**base, section: bad}).validate()
    with pytest.raises(ConfigError) as err:
        RECIPES["bitdistill"].from_dict({**base, "bitdistill": {"epochz": 1}}).validate()
    fields = {f.name for f in dataclasses.fields(BitDistillConfig)} - {"quant"}
    assert str(sorted(fields)) in str(err.value)  # the valid keys are the dataclass's own


@dataclass(frozen=True)
class Knobs(Section):
    times: int = field(default=2, metadata=limits(ge=1))


@dataclass(frozen=True)
class EchoRecipe(RecipeConfig):
    """A whole new recipe: its sections as fields, and ``run``."""

    knobs: Knobs = field(default_factory=Knobs)

    def run(self, resume: bool = False, progress: bool = True) -> dict:
        self.out.mkdir(parents=True)
        (self.out / "metrics.json").write_text(json.dumps({"times": self.knobs.times}))
        return {"times": self.knobs.times}


def test_a_new_recipe_is_one_registered_class(tmp_path):
    register_recipe("echo-test")(EchoRecipe)  # in a module: the @register_recipe decorator
    try:
        recipe = tmp_path / "e.yaml"
        recipe.write_text(yaml.safe_dump({"recipe": "echo-test", "knobs": {"times": 3}}))
        assert main(["run", str(recipe)]) == 0
        metrics = json.loads((tmp_path / "runs" / "recipe" / "metrics.json").read_text())
        assert metrics == {"times": 3}
        with pytest.raises(ConfigError, match="knobs.times: 0 must be >= 1"):
            run_recipe({"recipe": "echo-test", "knobs": {"times": 0}})
    finally:
        RECIPES.pop("echo-test")


def test_budget_sizes():
    assert parse_size("1GB") == 1024**3 and parse_size("1.5MB") == 1536 * 1024
    assert parse_size(40000) == 40000
    for bad in ("0", "0KB", "-1KB", "abc", "1TB"):
        with pytest.raises(ConfigError):
            parse_size(bad)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["plan", "M", "--budget", "60KB", "--dataset", "bogus"], "'bogus' is not a dataset"),
        (["plan", "M", "--budget", "60KB", "--samples", "0"], "--samples: 0 must be >= 1"),
        (["plan", "M", "--budget", "60KB", "--out", "/nonexistent/p.yaml"], "does not exist"),
        (["plan", "M", "--budget", "lots"], "cannot read the size 'lots'"),
        (["plan", "M", "--budget", "60KB", "--bits", "9"], "9 bits: use 2..8"),
        (["plan", "M", "--budget", "60KB", "--data-dir", "/nonexistent"], "not an existing"),
        (["bench", "M", "--input-shape", "abc"], "write sizes like 1,28,28"),
        (["bench", "M", "--batch", "-1"], "--batch: -1 must be >= 1"),
        (["bench", "M", "--reps", "0"], "--reps: 0 must be >= 1"),
        (["bench", "M", "--threads", "-3"], "--threads: -3 must be >= 1"),
        (["eval", "M", "--data-dir", "/nonexistent"], "'/nonexistent' is not an existing"),
        (["eval", "M", "--dataset", "cifar"], "'cifar' is not a dataset"),
        (["info", "M", "--threads", "x"], "'x' is not an integer"),
        (["demo", "--data-dir", "/nonexistent"], "not an existing folder"),
        (["demo", "--bits", "1"], "1 bits: use 2..8"),
        (["demo", "--student-epochs", "0"], "0 must be >= 1"),
    ],
)
def test_cli_values_are_checked_while_parsing(tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "m.qd.safetensors"
    model.write_bytes(b"not read: parsing fails first")
    argv = [str(model) if a == "M" else a for a in argv]
    one_line_exit_2(capsys, argv, needle)
    assert [p.name for p in tmp_path.iterdir()] == ["m.qd.safetensors"]  # nothing written


def test_demo_out_may_not_be_a_file(tmp_path, capsys):
    f = tmp_path / "f"
    f.write_text("")
    one_line_exit_2(capsys, ["demo", "--out", str(f)], "is an existing file")


def test_examples_parse(tmp_path):
    parsed = 0
    for example in sorted((Path(__file__).parents[1] / "examples").glob("*.yaml")):
        try:
            config = load_recipe(example)
        except QDistillError as exc:  # an offline model package (make bitdistill-models) missing
            assert "not installed" in str(exc), exc
            continue
        assert Path(config.output).is_relative_to(example.parent.resolve())
        parsed += 1
    assert parsed >= 3  # the image recipes need no model package
