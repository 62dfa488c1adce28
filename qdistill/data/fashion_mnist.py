"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017) from local idx files.

Offline first: the files come from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``), a ``data_dir`` / ``$QDISTILL_DATA_DIR``, or a cache
folder. Users who are online may pass ``download=True`` to fetch the four files once.
"""

from __future__ import annotations

import gzip
import os
import urllib.request
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from qdistill.errors import DataError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path.home() / ".cache" / "qdistill" / "fashion-mnist"
URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MEAN, STD = 0.2860, 0.3530


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read a gzipped idx file (images: magic 2051, labels: 2049), checking its header."""
    try:
        raw = gzip.open(path, "rb").read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path} is not a readable gzip idx file ({exc}); re-download it") from None
    if len(raw) < 8 or int.from_bytes(raw[:4], "big") != magic:
        raise DataError(f"{path} is corrupt: bad idx magic number (expected {magic})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise DataError(f"{path} is corrupt: {len(raw) - offset} bytes of data for shape {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def find_dir(data_dir: str | os.PathLike[str] | None) -> Path | None:
    """The first folder that holds the Fashion-MNIST files."""
    candidates = [Path(data_dir)] if data_dir else []
    if os.environ.get("QDISTILL_DATA_DIR"):
        candidates.append(Path(os.environ["QDISTILL_DATA_DIR"]))
    candidates += [DEBIAN_DIR, CACHE_DIR]
    for folder in candidates:
        if all((folder / f).is_file() for f in FILES["train"] + FILES["test"]):
            return folder
    return None


def download_files(target: Path = CACHE_DIR) -> Path:
    """Fetch the four files (for users who are online; no test calls this)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in FILES["train"] + FILES["test"]:
        dest = target / name
        if not dest.exists():
            tmp = dest.with_suffix(".part")
            urllib.request.urlretrieve(URL + name, tmp)  # noqa: S310 - fixed https-less mirror
            os.replace(tmp, dest)
    return target


def load_fashion_mnist(
    split: str = "train", data_dir: str | os.PathLike[str] | None = None, download: bool = False
) -> TensorDataset:
    """Images ``[N, 1, 28, 28]`` (normalised float32) and int64 labels of one split."""
    if split not in FILES:
        raise DataError(f"split={split!r}; Fashion-MNIST has splits {sorted(FILES)}")
    folder = find_dir(data_dir)
    if folder is None and download:
        folder = download_files()
    if folder is None:
        searched = ", ".join(
            str(p) for p in ([data_dir] if data_dir else []) + [DEBIAN_DIR, CACHE_DIR]
        )
        raise DataError(
            f"Fashion-MNIST not found (searched {searched}); install the Debian package "
            "dataset-fashion-mnist (apt-get install dataset-fashion-mnist), pass --data-dir DIR, "
            "or download=True when online"
        )
    images_file, labels_file = FILES[split]
    images = read_idx(folder / images_file, 2051)
    labels = read_idx(folder / labels_file, 2049)
    if len(images) != len(labels):
        raise DataError(f"{folder}: {len(images)} images but {len(labels)} labels for {split}")
    x = (torch.from_numpy(images.astype(np.float32) / 255.0) - MEAN) / STD
    return TensorDataset(x.unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
