"""Checkpoints (atomic, no pickle) and exact resume after a real kill."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
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


@pytest.mark.parametrize("where", ["writer", "replace"])
def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch, where):
    path = tmp_path / "c.safetensors"
    model = _net()
    save_checkpoint(path, model=model, meta={"epoch": 0})
    before = path.read_bytes()
    import qdistill.atomic as atomic

    def half_write(tensors, filename, metadata=None):  # dies midway through the temp file
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    if where == "writer":
        monkeypatch.setattr(atomic, "save_file", half_write)
    else:
        monkeypatch.setattr(atomic.os, "replace", crash)
    with torch.no_grad():
        model[0].weight.add_(1)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model=model, meta={"epoch": 1})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]
    assert load_checkpoint(path, model=_net()) == {"epoch": 0}


def test_checkpoint_layout_is_safetensors_plus_json(tmp_path):
    model = _net()
    opt = torch.optim.Adam(model.parameters())
    _train_steps(model, opt, n=1)
    save_checkpoint(tmp_path / "c.safetensors", model=model, optimizer=opt, meta={"epoch": 2})
    with safe_open(str(tmp_path / "c.safetensors"), framework="pt") as f:
        keys, header = set(f.keys()), json.loads(f.metadata()["qdistill_checkpoint"])
    assert {"model.0.weight", "model.2.bias"} <= keys
    assert {"optim.state.0.exp_avg", "optim.state.0.exp_avg_sq", "optim.state.3.step"} <= keys
    assert header["meta"] == {"epoch": 2}
    assert header["optimizer"]["param_groups"][0]["params"] == [0, 1, 2, 3]


def test_int_keyed_scheduler_state_survives(tmp_path):
    """MultiStepLR keeps its milestones in a Counter with int keys, which plain JSON loses."""

    def make():
        m = nn.Linear(2, 2)
        o = torch.optim.SGD(m.parameters(), lr=1.0)
        return m, o, torch.optim.lr_scheduler.MultiStepLR(o, milestones=[2, 4], gamma=0.1)

    m, o, s = make()
    o.step()
    s.step()
    save_checkpoint(tmp_path / "c.safetensors", model=m, optimizer=o, scheduler=s)
    m2, o2, s2 = make()
    load_checkpoint(tmp_path / "c.safetensors", model=m2, optimizer=o2, scheduler=s2)
    assert s2.milestones == {2: 1, 4: 1}
    lrs = []
    for _ in range(4):
        o2.step()
        s2.step()
        lrs.append(o2.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01])


def test_checkpoint_for_another_model_is_a_file_format_error(tmp_path):
    save_checkpoint(tmp_path / "c.safetensors", model=_net())
    with pytest.raises(FileFormatError, match="does not fit this model"):
        load_checkpoint(tmp_path / "c.safetensors", model=nn.Linear(6, 3))


def test_evaluate_counts_correct_and_restores_mode():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))  # predicts argmax of the input
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])
    y = torch.tensor([0, 1, 1, 0])  # 2 of 4 right
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    model.train()
    assert qd.evaluate(model, loader) == 0.5
    assert model.training
    model.eval()
    assert qd.evaluate(qd.supervised(model), loader) == 0.5
    assert not model.training


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
    assert json.loads(json.dumps(hist.to_dict())) == hist.to_dict()
    assert not model.training  # fit leaves the student in eval mode


def _linear_problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)


def _fit_mlp(ckpt, epochs, resume, **kw):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3)
    hist = qd.fit(
        qd.supervised(model),
        _linear_problem(),
        epochs=epochs,
        optimizer=opt,
        scheduler=sched,
        checkpoint_dir=ckpt,
        resume=resume,
        seed=1,
        progress=False,
        **kw,
    )
    return model, opt, hist


def test_resume_in_process_with_scheduler_matches_uninterrupted(tmp_path, caplog):
    full, _, h_full = _fit_mlp(tmp_path / "a", 3, False)
    _fit_mlp(tmp_path / "b", 2, False)  # "stopped" after two of three epochs
    steps = []
    with caplog.at_level(logging.WARNING, logger="qdistill.train.loop"):
        part, opt, h_part = _fit_mlp(
            tmp_path / "b", 3, True, callbacks=[lambda e, i: steps.append((e, i["epoch"]))]
        )
    assert "resuming from epoch 3/3" in caplog.text
    assert steps.count(("step", 2)) == 6 and ("step", 0) not in steps  # only epoch 3 ran
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)  # cosine restored, stepped 3 times
    assert h_part.to_dict() == h_full.to_dict()
    for a, b in zip(full.state_dict().values(), part.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_resume_false_overwrites_and_missing_checkpoint_starts_fresh(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="qdistill.train.loop"):
        _, _, h = _fit_mlp(tmp_path, 1, True)
    assert "no checkpoint" in caplog.text and len(h.train_loss) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qdistill.train.loop"):
        _, _, h = _fit_mlp(tmp_path, 2, False)
    assert "overwritten" in caplog.text and len(h.train_loss) == 2
    meta = load_checkpoint(tmp_path / "last.safetensors", model=_fit_mlp(None, 1, False)[0])
    assert meta["epoch"] == 1 and meta["seed"] == 1
    # a finished run resumed trains nothing and returns the stored history
    _, _, h2 = _fit_mlp(tmp_path, 2, True)
    assert h2.to_dict() == h.to_dict()


def test_resume_from_checkpoint_without_progress_is_a_file_format_error(tmp_path):
    model, _, _ = _fit_mlp(None, 1, False)
    opt = torch.optim.Adam(model.parameters())
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3)
    save_checkpoint(
        tmp_path / "last.safetensors", model=model, optimizer=opt, scheduler=sched, meta={}
    )
    with pytest.raises(FileFormatError, match="no training progress"):
        _fit_mlp(tmp_path, 2, True)


def test_progress_bar_prints_epoch_summary(capsys):
    model = nn.Linear(4, 2)
    qd.fit(qd.supervised(model), _linear_problem(), epochs=1, desc="demo")
    out = capsys.readouterr()
    assert "demo epoch 1/1: loss" in out.out + out.err


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
    # no torn temp file; the metrics log sits beside the checkpoint
    assert sorted(os.listdir(killed / "ckpt")) == ["last.safetensors", "metrics.jsonl"]
    with safe_open(str(killed / "ckpt" / "last.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["qdistill_checkpoint"])["meta"]["epoch"] == 0
    assert not (killed / "final.safetensors").exists()
    r = _run(killed, "resume")
    assert r.returncode == 0, r.stderr
    assert "resuming from epoch 2/3" in r.stderr
    a, b = load_file(full / "final.safetensors"), load_file(killed / "final.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and not trivially equal: training moved the weights away from their initial values
    torch.manual_seed(7)
    init = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))
    assert not torch.allclose(a["0.weight"], init[0].weight)


def test_checkpoint_gets_the_usual_file_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "c.safetensors", model=_net(), meta={"epoch": 0})
    finally:
        os.umask(umask)
    assert (path.stat().st_mode & 0o777) == 0o644
