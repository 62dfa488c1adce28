"""Data loading: idx parsing (hand-made files), errors, digits, the real files when present."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from qdistill.data import (
    DATASETS,
    get_dataset,
    load_digits_dataset,
    load_fashion_mnist,
    make_loaders,
)
from qdistill.data.fashion_mnist import DEBIAN_DIR, FILES, MEAN, STD
from qdistill.errors import ConfigError, DataError


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def _fake_fashion(folder: Path, n: int = 5) -> np.ndarray:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28))
    for split in ("train", "test"):
        img_name, lbl_name = FILES[split]
        _write_idx(folder / img_name, images, 2051)
        _write_idx(folder / lbl_name, np.arange(n) % 10, 2049)
    return images


def test_reads_idx_files_from_data_dir(tmp_path):
    images = _fake_fashion(tmp_path)
    ds = load_fashion_mnist("train", data_dir=tmp_path)
    x, y = ds.tensors
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32
    assert y.tolist() == [0, 1, 2, 3, 4]
    expected = (torch.tensor(images[2], dtype=torch.float32) / 255 - MEAN) / STD
    assert torch.allclose(x[2, 0], expected)


def test_corrupt_and_missing_files(tmp_path, monkeypatch):
    _fake_fashion(tmp_path)
    _write_idx(tmp_path / FILES["train"][0], np.zeros((5, 28, 28)), 2049)  # wrong magic
    with pytest.raises(DataError, match="magic"):
        load_fashion_mnist("train", data_dir=tmp_path)
    (tmp_path / FILES["train"][0]).write_bytes(b"not gzip")
    with pytest.raises(DataError, match="gzip"):
        load_fashion_mnist("train", data_dir=tmp_path)
    monkeypatch.setattr("qdistill.data.fashion_mnist.DEBIAN_DIR", tmp_path / "none")
    monkeypatch.setattr("qdistill.data.fashion_mnist.CACHE_DIR", tmp_path / "none2")
    monkeypatch.delenv("QDISTILL_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", data_dir=tmp_path / "empty")


@pytest.mark.skipif(
    not (DEBIAN_DIR / FILES["train"][0]).exists(), reason="dataset-fashion-mnist not installed"
)
def test_real_fashion_mnist():
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    assert len(train) == 60_000 and len(test) == 10_000
    assert set(test.tensors[1].unique().tolist()) == set(range(10))
    assert abs(float(train.tensors[0].mean())) < 0.05


def test_digits_split_is_disjoint_and_deterministic():
    a, b = load_digits_dataset("train"), load_digits_dataset("test")
    assert len(a) + len(b) == 1797
    assert a.tensors[0].shape[1:] == (1, 8, 8)
    flat_a = {tuple(r.tolist()) for r in a.tensors[0].reshape(len(a), -1)}
    overlap = sum(tuple(r.tolist()) in flat_a for r in b.tensors[0].reshape(len(b), -1))
    assert overlap < 10  # a few digits images are exact duplicates in the data set itself
    assert torch.equal(load_digits_dataset("train").tensors[1], a.tensors[1])


def test_loaders_and_names():
    train, test = make_loaders("digits", batch_size=50, subset=300)
    assert len(train.dataset) == 300 and len(test.dataset) == 100
    x, y = next(iter(train))
    assert x.shape == (50, *DATASETS["digits"]["input_shape"])
    with pytest.raises(ConfigError, match="unknown dataset"):
        get_dataset("cifar", "train")
