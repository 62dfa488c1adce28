"""Data: idx parsing on hand-made files, corrupt and missing files, the offline search order,
the (mocked) download, digits splits, loaders, and the real Fashion-MNIST files when present."""

from __future__ import annotations

import gzip
import io
import urllib.error
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
    split_validation,
)
from qdistill.data import fashion_mnist as fm
from qdistill.errors import ConfigError, DataError


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    path.write_bytes(_idx_bytes(array, magic))


def _fake_fashion(folder: Path, n: int = 5, splits=("train", "test")) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    images = np.random.default_rng(0).integers(0, 256, size=(n, 28, 28))
    for split in splits:
        img_name, lbl_name = fm.FILES[split]
        _write_idx(folder / img_name, images, 2051)
        _write_idx(folder / lbl_name, np.arange(n) % 10, 2049)
    return images


@pytest.fixture
def no_default_dirs(tmp_path, monkeypatch):
    """Hide the Debian folder, the cache and the environment variable from the search."""
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setattr(fm, "CACHE_DIR", tmp_path / "no-cache")
    monkeypatch.delenv("QDISTILL_DATA_DIR", raising=False)


def test_reads_and_normalises_idx_files_from_data_dir(tmp_path):
    images = _fake_fashion(tmp_path)
    x, y = load_fashion_mnist("train", data_dir=tmp_path).tensors
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == [0, 1, 2, 3, 4]
    expected = (torch.tensor(images[2], dtype=torch.float32) / 255 - 0.2860) / 0.3530
    assert torch.allclose(x[2, 0], expected)


def test_search_order_env_var_before_debian_and_split_needs_only_its_files(tmp_path, monkeypatch):
    _fake_fashion(tmp_path / "env", n=3, splits=("test",))
    monkeypatch.setenv("QDISTILL_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setattr(fm, "CACHE_DIR", tmp_path / "no-cache")
    assert len(load_fashion_mnist("test")) == 3  # only the test files are there: enough
    with pytest.raises(DataError, match="not found"):
        load_fashion_mnist("train")
    _fake_fashion(tmp_path / "given", n=4)
    assert len(load_fashion_mnist("test", data_dir=tmp_path / "given")) == 4  # data_dir first


@pytest.mark.parametrize(
    "corruption, message",
    [
        ("wrong-magic", "magic number 2049, expected 2051"),
        ("short-payload", "bytes of data for shape"),
        ("not-gzip", "not a readable gzip"),
        ("truncated-gzip", "not a readable gzip"),
        ("wrong-side", "expected 28x28"),
    ],
)
def test_corrupt_images_file_is_named(tmp_path, corruption, message):
    _fake_fashion(tmp_path)
    target = tmp_path / fm.FILES["train"][0]
    if corruption == "wrong-magic":
        _write_idx(target, np.zeros((5, 28, 28)), 2049)
    elif corruption == "short-payload":
        good = gzip.decompress(target.read_bytes())
        target.write_bytes(gzip.compress(good[:-7]))
    elif corruption == "not-gzip":
        target.write_bytes(b"not gzip at all")
    elif corruption == "truncated-gzip":
        target.write_bytes(target.read_bytes()[:100])
    else:
        _write_idx(target, np.zeros((5, 27, 27)), 2051)
    with pytest.raises(DataError, match=message) as info:
        load_fashion_mnist("train", data_dir=tmp_path)
    assert str(target) in str(info.value) and "corrupt" in str(info.value)
    assert len(load_fashion_mnist("test", data_dir=tmp_path)) == 5  # the other split is intact


def test_corrupt_labels_file_is_named(tmp_path):
    _fake_fashion(tmp_path)
    labels = tmp_path / fm.FILES["train"][1]
    _write_idx(labels, np.arange(4), 2049)
    with pytest.raises(DataError, match="4 labels for 5 images"):
        load_fashion_mnist("train", data_dir=tmp_path)
    _write_idx(labels, np.array([0, 1, 2, 3, 12]), 2049)
    with pytest.raises(DataError, match="label 12"):
        load_fashion_mnist("train", data_dir=tmp_path)


def test_missing_files_give_one_line_naming_folders_and_fixes(
    tmp_path, monkeypatch, no_default_dirs
):
    monkeypatch.setenv("QDISTILL_DATA_DIR", str(tmp_path / "from-env"))

    def no_network(*args, **kwargs):
        raise AssertionError("download=False must not touch the network")

    monkeypatch.setattr(fm.urllib.request, "urlopen", no_network)
    with pytest.raises(DataError) as info:
        load_fashion_mnist("train", data_dir=tmp_path / "empty")
    message = str(info.value)
    assert "\n" not in message
    for part in ("empty", "from-env", "no-debian", "no-cache"):
        assert part in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--data-dir DIR" in message and "download=True" in message
    with pytest.raises(DataError, match="splits"):
        load_fashion_mnist("validation", data_dir=tmp_path)


def test_download_writes_into_the_cache_atomically(tmp_path, monkeypatch, no_default_dirs):
    source = tmp_path / "server"
    _fake_fashion(source, n=6)
    requested = []

    def fake_urlopen(url, timeout):
        assert url.startswith(fm.URL)
        requested.append(url.rsplit("/", 1)[1])
        return io.BytesIO((source / requested[-1]).read_bytes())

    monkeypatch.setattr(fm.urllib.request, "urlopen", fake_urlopen)
    ds = load_fashion_mnist("train", download=True)
    assert len(ds) == 6
    assert sorted(requested) == sorted(fm.FILES["train"] + fm.FILES["test"])
    cache = tmp_path / "no-cache"
    assert sorted(p.name for p in cache.iterdir()) == sorted(requested)  # no temp files left
    load_fashion_mnist("test", download=True)
    assert len(requested) == 4  # cached files are not fetched again


def test_failed_download_leaves_no_partial_file(tmp_path, monkeypatch, no_default_dirs):
    def offline(url, timeout):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(fm.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="downloading .* failed"):
        load_fashion_mnist("train", download=True)
    assert list((tmp_path / "no-cache").iterdir()) == []


@pytest.mark.skipif(
    not (fm.DEBIAN_DIR / fm.FILES["train"][0]).exists(),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_real_fashion_mnist_files(monkeypatch):
    monkeypatch.delenv("QDISTILL_DATA_DIR", raising=False)
    train = load_fashion_mnist("train", data_dir=fm.DEBIAN_DIR)
    test = load_fashion_mnist("test", data_dir=fm.DEBIAN_DIR)
    assert train.tensors[0].shape == (60_000, 1, 28, 28)
    assert test.tensors[0].shape == (10_000, 1, 28, 28)
    for ds in (train, test):
        labels = ds.tensors[1]
        assert labels.min() == 0 and labels.max() == 9
        assert torch.bincount(labels).tolist() == [len(labels) // 10] * 10  # balanced classes
    x = train.tensors[0]
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1) < 0.01


def test_digits_split_is_disjoint_deterministic_and_standardised():
    train, test = load_digits_dataset("train"), load_digits_dataset("test")
    assert (len(train), len(test)) == (1348, 449)
    assert train.tensors[0].shape[1:] == (1, 8, 8) and train.tensors[0].dtype == torch.float32
    assert train.tensors[1].dtype == torch.int64
    from sklearn.datasets import load_digits

    raw = torch.tensor(load_digits().data, dtype=torch.float32)
    raw = (raw - raw.mean()) / raw.std()

    def rows_of(ds):  # map each example back to its row in the full data set
        flat = ds.tensors[0].reshape(len(ds), -1)
        return {int(torch.cdist(r[None], raw).argmin()) for r in flat}

    train_rows, test_rows = rows_of(train), rows_of(test)
    assert len(train_rows & test_rows) < 10  # disjoint, bar a few exact duplicate images
    assert len(train_rows | test_rows) > 1780  # and together they cover the set
    assert torch.equal(load_digits_dataset("train").tensors[0], train.tensors[0])
    assert not torch.equal(load_digits_dataset("test", seed=1).tensors[1], test.tensors[1])
    all_x = torch.cat([train.tensors[0], test.tensors[0]])
    assert abs(float(all_x.mean())) < 0.05 and abs(float(all_x.std()) - 1) < 0.05
    with pytest.raises(DataError, match="splits"):
        load_digits_dataset("val")
    with pytest.raises(DataError, match="test_fraction"):
        load_digits_dataset("train", test_fraction=1.5)


def test_make_loaders_subset_shapes_and_global_rng_shuffle():
    train, test = make_loaders("digits", batch_size=50, subset=300, eval_batch_size=64)
    assert len(train.dataset) == 300 and len(test.dataset) == 300
    assert train.generator is None and train.num_workers == 0 and test.batch_size == 64
    x, y = next(iter(train))
    assert x.shape == (50, *DATASETS["digits"]["input_shape"]) and y.shape == (50,)
    torch.manual_seed(7)
    first = next(iter(train))[1]
    torch.manual_seed(7)
    assert torch.equal(next(iter(train))[1], first)  # the global seed fixes the order
    again, _ = make_loaders("digits", batch_size=50, subset=300)
    assert train.dataset.indices == again.dataset.indices  # the subset itself is fixed
    other, _ = make_loaders("digits", batch_size=50, subset=300, seed=1)
    assert train.dataset.indices != other.dataset.indices


def test_make_loaders_validation_split_replaces_test():
    train, val = make_loaders("digits", subset=400, val_fraction=0.25)
    assert len(train.dataset) == 300 and len(val.dataset) == 100
    assert not set(train.dataset.indices) & set(val.dataset.indices)
    assert train.dataset.dataset is val.dataset.dataset  # both come from the train split
    with pytest.raises(ConfigError, match="between 0 and 1"):
        make_loaders("digits", val_fraction=1.0)


def test_split_validation_keeps_batch_size_and_is_disjoint():
    train, _ = make_loaders("digits", batch_size=32)
    rest, val = split_validation(train, fraction=0.2, seed=0)
    assert rest.batch_size == 32 and len(rest.dataset) + len(val.dataset) == len(train.dataset)
    assert not set(rest.dataset.indices) & set(val.dataset.indices)


def test_dataset_names_and_metadata():
    assert DATASETS["fashion-mnist"] == {"input_shape": (1, 28, 28), "num_classes": 10}
    assert DATASETS["digits"] == {"input_shape": (1, 8, 8), "num_classes": 10}
    assert len(get_dataset("digits", "test")) == 449
    with pytest.raises(ConfigError, match="unknown dataset 'cifar'.*digits.*fashion-mnist"):
        get_dataset("cifar", "train")
    with pytest.raises(ConfigError, match="subset"):
        make_loaders("digits", subset=0)
