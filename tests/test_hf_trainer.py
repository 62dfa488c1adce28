"""qd.DistillTrainer: the Hugging Face Trainer with a teacher, a qdistill loss and a
QuantConfig, in one process and under ``accelerate launch`` with 2 CPU processes."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import qdistill as qd
from qdistill.quant.modules import QuantLinear

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "tests" / "_hf_trainer_script.py"


def _script():
    spec = importlib.util.spec_from_file_location("_hf_trainer_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compute_loss_is_kd_of_the_quantized_student_against_the_teacher(tmp_path):
    s = _script()
    trainer = s.trainer(str(tmp_path), batch=8)
    student, teacher = trainer.model, trainer.teacher
    assert isinstance(student.bert.encoder.layer[0].attention.self.query, QuantLinear)
    assert not isinstance(student.classifier, QuantLinear)  # the rule kept it float
    batch = {k: torch.stack([s.Tokens()[i][k] for i in range(8)]) for k in s.Tokens()[0]}
    loss = trainer.compute_loss(student, batch)
    # the same by hand with torch ops: 0.5 * T^2 * KL(teacher || student at T) + 0.5 * CE
    kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    st = student(**kw).logits
    with torch.no_grad():
        te = teacher(**kw).logits
    t = 2.0
    kl = F.kl_div(F.log_softmax(st / t, -1), F.log_softmax(te / t, -1), log_target=True,
                  reduction="batchmean")  # fmt: skip
    expected = 0.5 * t * t * kl + 0.5 * F.cross_entropy(st, batch["labels"])
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is frozen
    assert student.bert.encoder.layer[0].attention.self.query.weight.grad is not None


def test_trainer_trains_the_student_and_saves_it_packed(tmp_path):
    s = _script()
    trainer = s.trainer(str(tmp_path), batch=8)
    teacher_before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4  # the Trainer's own logging, one entry per step
    teacher_after = trainer.teacher.state_dict()
    assert all(torch.equal(teacher_before[k], teacher_after[k]) for k in teacher_before)
    assert not trainer.teacher.training
    moved = [k for k, v in trainer.model.state_dict().items()
             if not torch.equal(v, student_before[k])]  # fmt: skip
    assert len(moved) > 10
    path = tmp_path / "student.qd.safetensors"
    assert trainer.packed.path == path and path.is_file()
    header = qd.pack.read_header(path)
    assert header["layers"]["bert.encoder.layer.0.attention.self.query"]["format"]["bits"] == 4
    # the packed model computes what the fake-quant student computes
    loaded = qd.load(path).eval()
    ids = torch.stack([s.Tokens()[i]["input_ids"] for i in range(4)])
    mask = torch.stack([s.Tokens()[i]["attention_mask"] for i in range(4)])
    trainer.model.eval()
    with torch.no_grad():
        want = trainer.model(input_ids=ids, attention_mask=mask).logits
        got = loaded(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())


def test_a_trainer_checkpoint_resumes_the_same_run(tmp_path):
    """The Trainer's checkpoints hold the float master weights (not packed codes, which would
    leave every quantized layer at its initial weights on resume)."""
    s = _script()
    runs = []
    for resume in (None, str(tmp_path / "checkpoint-2")):
        trainer = s.trainer(str(tmp_path), batch=8)
        trainer.args.save_strategy, trainer.args.save_steps = "steps", 2
        trainer.train(resume_from_checkpoint=resume)
        runs.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    query = "bert.encoder.layer.0.attention.self.query.weight"
    assert query in load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_accelerate_launch_with_two_cpu_processes_matches_one_process(tmp_path):
    """2 processes x 4 examples = the global batch of the 1-process run with 8: same weights."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    two = tmp_path / "two"
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    r = subprocess.run(
        [sys.executable, *launch, str(SCRIPT), str(two), "4"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 1 of 2" in r.stdout  # really two processes
    one = _script().trainer(str(tmp_path / "one"), batch=8)  # the reference, in this process
    one.train()
    ref = one.model.state_dict()
    r0, r1 = load_file(two / "rank0.safetensors"), load_file(two / "rank1.safetensors")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    diff = max(float((ref[k] - r0[k]).abs().max()) for k in ref)
    print(f"max abs difference accelerate 2 processes vs 1 process: {diff:.3g}")
    assert diff < 1e-5
    assert sorted(os.listdir(two)) == ["rank0.safetensors", "rank1.safetensors",
                                       "student.qd.safetensors"]  # fmt: skip
