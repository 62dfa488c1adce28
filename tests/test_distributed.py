"""Data-parallel fit (DDP and FSDP2) with real gloo process groups on this CPU (2 processes),
and the errors a distributed run can meet. Each multi-process test starts real processes
(torch import included), so they take seconds, not milliseconds; the models are a few hundred
parameters."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import qdistill as qd
from qdistill.cli import main
from qdistill.errors import ConfigError
from qdistill.train import distributed as dist
from qdistill.train.tracking import read_jsonl

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "tests" / "_ddp_script.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TOL = 1e-5  # float32 sums in another order (two half-batch means averaged vs one mean)


def _script():
    spec = importlib.util.spec_from_file_location("_ddp_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _single(out: Path, quant: str, epochs: int, resume: bool = False) -> dict:
    """The 1-process reference, in this process (threads restored after)."""
    threads = torch.get_num_threads()
    try:
        _script().single(str(out), quant, epochs, resume)
    finally:
        torch.set_num_threads(threads)
    return load_file(out / "single.safetensors")


def _ddp(out: Path, quant: str, epochs: int, resume: bool = False, world: int = 2) -> None:
    args = [sys.executable, str(SCRIPT), str(out), "ddp", quant, str(epochs)]
    args += ["resume"] if resume else []
    r = subprocess.run([*args, str(world)], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_two_gloo_processes_give_the_weights_of_one_process_over_the_global_batch(tmp_path):
    ref = _single(tmp_path / "single", "static", epochs=2)
    _ddp(tmp_path / "ddp", "static", epochs=2)
    r0 = load_file(tmp_path / "ddp" / "rank0.safetensors")
    r1 = load_file(tmp_path / "ddp" / "rank1.safetensors")
    assert _max_diff(r0, r1) == 0.0  # the ranks hold one model
    diff = _max_diff(ref, r0)
    print(f"max abs difference DDP (2 gloo processes) vs 1 process: {diff:.3g}")
    assert diff < TOL
    # the weights moved (the comparison is not of two untrained models)
    script = _script()
    torch.manual_seed(2)
    init = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).state_dict()
    assert float((init["0.weight"] - r0["0.weight"]).abs().max()) > 100 * TOL
    # quantizer buffers: rank 1 calibrated on other data, yet holds rank 0's ranges
    _, own1 = script.models(script.data().tensors[0][32:64], "static")
    assert float((own1.state_dict()["0.act_scale"] - r1["0.act_scale"]).abs().max()) > 1e-3
    assert torch.equal(r1["0.act_scale"], ref["0.act_scale"])
    # only rank 0 wrote the checkpoint and the metrics log; the epoch figures are global
    assert sorted(os.listdir(tmp_path / "ddp" / "ckpt")) == ["last.safetensors", "metrics.jsonl"]
    epochs = [r for r in read_jsonl(tmp_path / "ddp" / "ckpt" / "metrics.jsonl")
              if r["event"] == "epoch"]  # fmt: skip
    single = [r for r in read_jsonl(tmp_path / "single" / "ckpt" / "metrics.jsonl")
              if r["event"] == "epoch"]  # fmt: skip
    assert [e["world_size"] for e in epochs] == [2, 2]
    for a, b in zip(epochs, single, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["train_acc"] == b["train_acc"]
        assert a["val_acc"] == b["val_acc"]  # each rank evaluated its half; counts summed


def test_a_killed_rank_fails_the_run_and_it_resumes_on_one_process(tmp_path):
    """2 processes with learned LSQ steps; rank 1 dies by SIGKILL in epoch 2: the run fails
    (the other rank is ended, no hang) leaving the epoch-1 checkpoint, which resumes on ONE
    process to the weights of an uninterrupted 1-process run (the data order depends on
    (seed, epoch) only, not on the number of processes)."""
    full = _single(tmp_path / "full", "lsq", epochs=2)
    args = [sys.executable, str(SCRIPT), str(tmp_path / "mixed"), "ddp", "lsq", "2", "kill", "2"]
    r = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "SIGKILL" in r.stderr, r.stderr[-3000:]
    ckpt = tmp_path / "mixed" / "ckpt"
    assert sorted(os.listdir(ckpt)) == ["last.safetensors", "metrics.jsonl"]  # no torn file
    assert not (tmp_path / "mixed" / "rank0.safetensors").exists()
    resumed = _single(tmp_path / "mixed", "lsq", epochs=2, resume=True)
    assert "0.weight_step" in resumed
    diff = _max_diff(full, resumed)
    print(f"max abs difference 2 processes (killed) + 1 process (resumed) vs 1 process: {diff:.3g}")
    assert diff < TOL
    epochs = [r for r in read_jsonl(ckpt / "metrics.jsonl") if r["event"] == "epoch"]
    assert [e["world_size"] for e in epochs] == [2, 1]


def test_fsdp2_resumes_a_1_process_checkpoint_and_writes_one_that_resumes_again(tmp_path):
    """strategy='fsdp' (fully_shard, 2 gloo processes) with learned LSQ steps: resumed from a
    1-process checkpoint (optimizer state sharded in), its weights equal an uninterrupted
    1-process run, and its own checkpoint (optimizer state gathered) resumes on 1 process."""
    full2 = _single(tmp_path / "full2", "lsq", epochs=2)
    full3 = _single(tmp_path / "full3", "lsq", epochs=3)
    _single(tmp_path / "mixed", "lsq", epochs=1)
    args = [sys.executable, str(SCRIPT), str(tmp_path / "mixed"), "fsdp", "lsq", "2", "resume"]
    r = subprocess.run([*args, "2"], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r0 = load_file(tmp_path / "mixed" / "rank0.safetensors")
    r1 = load_file(tmp_path / "mixed" / "rank1.safetensors")
    assert _max_diff(r0, r1) == 0.0  # the full weights gathered on every rank
    diff = _max_diff(full2, r0)
    print(f"max abs difference FSDP2 (2 processes, resumed) vs 1 process: {diff:.3g}")
    assert diff < TOL
    third = _single(tmp_path / "mixed", "lsq", epochs=3, resume=True)
    assert _max_diff(full3, third) < TOL


def test_fsdp_refuses_what_it_cannot_shard_yet():
    from qdistill.train.fsdp import check_supported

    run = qd.supervised(nn.Linear(2, 2))
    opt = torch.optim.SGD(run.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="optimizer or scheduler.*use strategy 'ddp'"):
        check_supported(run, opt, None, None)
    with pytest.raises(ConfigError, match="callbacks"):
        check_supported(run, None, None, [print])
    check_supported(run, None, None, None)  # the plain case passes
    with pytest.raises(ConfigError, match="strategy='zero'"):
        qd.fit(run, [(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))], epochs=1,
               strategy="zero")  # fmt: skip


def test_a_recipe_under_torchrun_writes_one_checkpoint_and_one_result(tmp_path):
    spec = {
        "recipe": "quantized_distillation",
        "dataset": "digits",
        "output": "run",
        "batch_size": 32,
        "subset": 128,
        "teacher": {"model": "mlp", "kwargs": {"hidden": [32]}, "epochs": 1},
        "student": {"model": "mlp", "kwargs": {"hidden": [16]}},
        "quant": {"weights": {"kind": "int", "bits": 4, "group_size": 64}},
        "train": {"epochs": 1},
        "distributed": {"backend": "gloo", "timeout_s": 60},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(spec))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "qdistill.cli", "run", str(tmp_path / "r.yaml"), "--no-progress"],
        env={**ENV, "TMPDIR": str(scratch)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "run"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["student", "teacher"]
    for stage in ("student", "teacher"):
        assert os.listdir(out / "checkpoints" / stage) == ["last.safetensors"]
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "checkpoints", "metrics.json", "metrics.jsonl", "student.qd.safetensors",
        "teacher.qd.safetensors",
    ]  # fmt: skip
    assert r.stdout.count('"student_accuracy"') == 1  # one rank printed the result
    metrics = json.loads((out / "metrics.json").read_text())
    assert qd.load(metrics["student_file"]) is not None
    records = read_jsonl(out / "metrics.jsonl")
    epochs = [x for x in records if x["event"] == "epoch"]
    assert [(e["stage"], e["world_size"]) for e in epochs] == [
        ("teacher", 2), ("quantized_distillation", 2)
    ]  # fmt: skip
    # 128 examples, global batch 32: 4 steps per stage, logged once (rank 0)
    assert sum(x["event"] == "step" for x in records) == 8
    assert not list(scratch.glob("qdistill-rank*"))  # the other rank's scratch output is gone


# ---------------------------------------------------------------------------- bad input


def test_a_batch_or_dataset_the_world_cannot_split_is_a_config_error():
    ds = TensorDataset(torch.zeros(10, 2), torch.zeros(10, dtype=torch.long))
    world = dist.World(rank=1, size=4, backend="gloo")
    with pytest.raises(ConfigError, match="batch size 6 cannot be split over 4 processes"):
        dist.shard_loader(DataLoader(ds, batch_size=6), world, seed=0)
    tiny = TensorDataset(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ConfigError, match="3 training examples cannot be split over 4"):
        dist.shard_loader(DataLoader(tiny, batch_size=4), world, seed=0)
    with pytest.raises(ConfigError, match="must be a torch DataLoader"):
        dist.shard_loader([(torch.zeros(4, 2), torch.zeros(4))], world, seed=0)
    # a good split: rank 1's quarter of each global batch of 8, in a DistributedSampler
    sharded = dist.shard_loader(DataLoader(ds, batch_size=8, shuffle=True), world, seed=0)
    assert sharded.batch_size == 2 and sharded.sampler.rank == 1 and sharded.sampler.shuffle


def test_each_rank_evaluates_its_share_of_the_validation_data_once():
    ds = TensorDataset(torch.arange(10).float()[:, None], torch.zeros(10, dtype=torch.long))
    seen = []
    for rank in range(3):
        part = dist.eval_shard(DataLoader(ds, batch_size=4), dist.World(rank, 3, "gloo"))
        seen.append([int(v) for x, _ in part for v in x[:, 0]])
    assert seen == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]  # every example once, none padded


def test_teacher_on_another_device_than_the_student_is_one_clear_error():
    teacher = nn.Linear(4, 2, device="meta")
    student = nn.Linear(4, 2)
    loader = DataLoader(TensorDataset(torch.zeros(4, 4), torch.zeros(4, dtype=torch.long)))
    with pytest.raises(ConfigError, match="teacher is on meta and the student on cpu"):
        qd.fit(qd.distill(teacher, student), loader, epochs=1, progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="nccl may work on this machine")
def test_nccl_where_there_is_none_exits_2_with_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="use backend gloo"):
        dist.check_backend("nccl")
    spec = {
        "recipe": "train",
        "dataset": "digits",
        "output": "run",
        "subset": 32,
        "student": {"model": "mlp", "kwargs": {"hidden": [8]}},
        "train": {"epochs": 1},
    }
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(spec))
    assert main(["run", str(recipe), "--backend", "nccl", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nccl" in err[0] and "gloo" in err[0]
    recipe.write_text(yaml.safe_dump({**spec, "distributed": {"backend": "nccl"}}))
    assert main(["run", str(recipe), "--no-progress"]) == 2
    assert "use backend gloo" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_rank_that_never_arrives_times_out_instead_of_hanging(tmp_path):
    """WORLD_SIZE=2 but only rank 0 started: the rendezvous gives up after timeout_s."""
    code = (
        "from qdistill.train import distributed as d\n"
        "try:\n    d.init_from_env('gloo', timeout_s=2)\n"
        "except Exception as e:\n    print(type(e).__name__, e)\n"
    )
    env = {**ENV, "WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_script().free_port())}  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert r.stdout.startswith("ConfigError could not join the process group within 2 s"), (
        r.stdout + r.stderr
    )
