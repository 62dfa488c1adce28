"""fit on divergence and on tampered checkpoints (issue 12, items 6-7)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import qdistill as qd
from qdistill.errors import ConfigError, FileFormatError, TrainingError
from qdistill.train.checkpoint import META_KEY


def data(nan_batch: int | None = None) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = (x[:, 0] > 0).long()
    if nan_batch is not None:
        x[nan_batch * 16] = float("nan")  # one NaN row in that batch of 16
    return DataLoader(TensorDataset(x, y), batch_size=16)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_nan_loss_stops_naming_the_step_and_checkpoints_nothing(tmp_path):
    m = model()
    with pytest.raises(TrainingError, match=r"loss is nan at epoch 1, step 2"):
        qd.fit(qd.supervised(m), data(2), epochs=2, checkpoint_dir=tmp_path, progress=False)
    # no checkpoint of the failing epoch; only the metrics of the steps before it
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    assert all(torch.isfinite(p).all() for p in m.parameters())  # the NaN never reached them


def test_skip_policy_drops_the_bad_batch_and_trains_on(tmp_path, caplog):
    m = model()
    h = qd.fit(
        qd.supervised(m), data(2), epochs=2, checkpoint_dir=tmp_path, progress=False,
        on_nonfinite="skip",
    )  # fmt: skip
    assert all(torch.isfinite(torch.tensor(h.train_loss)))
    assert (tmp_path / "last.safetensors").exists()
    assert "step 2; batch skipped" in caplog.text
    # the same as training on the three good batches only
    ref = model()
    good = [b for i, b in enumerate(data(2)) if i != 2]
    qd.fit(qd.supervised(ref), good, epochs=2, progress=False)
    for a, b in zip(m.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)


def test_unknown_policy_is_a_config_error():
    with pytest.raises(ConfigError, match="on_nonfinite"):
        qd.fit(qd.supervised(model()), data(), epochs=1, on_nonfinite="ignore")


def test_a_huge_learning_rate_diverges_into_an_error_not_nan_weights(tmp_path):
    m = model()
    with pytest.raises(TrainingError, match="loss is|NaN or Inf"):
        qd.fit(qd.supervised(m), data(), epochs=3, lr=1e30, checkpoint_dir=tmp_path, progress=False)
    assert not (tmp_path / "last.safetensors").exists() or _all_finite(
        tmp_path / "last.safetensors"
    )


def _all_finite(path) -> bool:
    with safe_open(str(path), framework="pt") as f:
        return all(
            torch.isfinite(f.get_tensor(k)).all() for k in f.keys() if k.startswith("model.")
        )


def _tamper(path, edit) -> None:
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        doc = json.loads(f.metadata()[META_KEY])
    edit(doc, tensors)
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(doc)})


def _checkpointed(tmp_path):
    qd.fit(qd.supervised(model()), data(), epochs=1, checkpoint_dir=tmp_path, progress=False)
    return tmp_path / "last.safetensors"


def _resume(tmp_path):
    qd.fit(
        qd.supervised(model()), data(), epochs=3, checkpoint_dir=tmp_path, resume=True,
        progress=False,
    )  # fmt: skip


def _drop_optimizer(doc, tensors):
    del doc["optimizer"]
    for k in [k for k in tensors if k.startswith("optim.")]:
        del tensors[k]


def _drop_one_state_tensor(doc, tensors):
    del tensors[next(k for k in tensors if k.endswith("exp_avg_sq"))]


@pytest.mark.parametrize(
    "edit, match",
    [
        (_drop_optimizer, "no optimizer state"),
        (_drop_one_state_tensor, "optimizer state tensors"),
        (lambda doc, t: doc["meta"].update(epoch=-5), "epoch -5"),
        (lambda doc, t: doc["meta"].update(epoch=True), "epoch True"),
        (lambda doc, t: doc.pop("meta"), "no 'meta' section"),
        (lambda doc, t: doc["meta"]["history"]["train_loss"].append(0.1), "2 epochs of losses"),
    ],
)
def test_tampered_checkpoints_are_clear_errors(tmp_path, edit, match):
    path = _checkpointed(tmp_path)
    _tamper(path, edit)
    with pytest.raises(FileFormatError, match=match):
        _resume(tmp_path)
