"""Checkpoints (atomic, no pickle) and exact resume after a real kill."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import qdistill as qd
from qdistill.errors import FileFormatError
from qdistill.train import load_checkpoint, save_checkpoint

SCRIPT = Path(__file__).with_name("_resume_script.py")


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def _train_steps(model, opt, n=4):
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        loss = model(torch.randn(8, 6, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_checkpoint_round_trip_continues_identically(tmp_path):
    a = _net()
    opt_a = torch.optim.Adam(a.parameters(), lr=1e-2)
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a, step_size=1, gamma=0.5)
    _train_steps(a, opt_a)
    sched_a.step()
    save_checkpoint(
        tmp_path / "c.safetensors", model=a, optimizer=opt_a, scheduler=sched_a, meta={"epoch": 3}
    )
    b = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    opt_b = torch.optim.Adam(b.parameters(), lr=1.0)
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b, step_size=1, gamma=0.5)
    meta = load_checkpoint(tmp_path / "c.safetensors", model=b, optimizer=opt_b, scheduler=sched_b)
    assert meta == {"epoch": 3}
    assert opt_b.param_groups[0]["lr"] == opt_a.param_groups[0]["lr"]
    _train_steps(a, opt_a)
    _train_steps(b, opt_b)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_foreign_and_garbage_checkpoints(tmp_path):
    save_file({"x": torch.zeros(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(FileFormatError, match="not a qdistill checkpoint"):
        load_checkpoint(tmp_path / "plain.safetensors", model=_net())
    (tmp_path / "junk.safetensors").write_bytes(b"junk" * 10)
    with pytest.raises(FileFormatError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.safetensors", model=_net())
    with pytest.raises(FileFormatError, match="does not exist"):
        load_checkpoint(tmp_path / "none.safetensors", model=_net())


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    model = _net()
    save_checkpoint(path, model=model, meta={"epoch": 0})
    before = path.read_bytes()
    import qdistill.atomic as atomic

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", crash)
    with torch.no_grad():
        model[0].weight.add_(1)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model=model, meta={"epoch": 1})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]


def test_fit_records_history_and_learns():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    y = (x[:, 0] > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    model = nn.Linear(4, 2)
    hist = qd.fit(
        qd.supervised(model), loader, epochs=3, val_loader=loader, lr=0.05, progress=False
    )
    assert len(hist.train_loss) == len(hist.val_acc) == 3
    assert hist.train_loss[-1] < hist.train_loss[0]
    assert hist.final_val_acc > 0.9


def _run(out, mode):
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(out), mode],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )


def test_resume_after_sigkill_ends_with_identical_weights(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    r = _run(full, "full")
    assert r.returncode == 0, r.stderr
    r = _run(killed, "kill")
    assert r.returncode == -9, r.stderr  # really died, mid-epoch 2
    assert (killed / "ckpt" / "last.safetensors").exists()
    assert not (killed / "final.safetensors").exists()
    r = _run(killed, "resume")
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    a, b = load_file(full / "final.safetensors"), load_file(killed / "final.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and not trivially equal: training moved the weights away from their initial values
    torch.manual_seed(7)
    init = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))
    assert not torch.allclose(a["0.weight"], init[0].weight)
