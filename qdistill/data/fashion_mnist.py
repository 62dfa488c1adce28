"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017) from local idx files.

Offline first, because most runs happen on machines without internet: the four ``.gz`` idx
files are looked up in ``data_dir``, then ``$QDISTILL_DATA_DIR``, then
``/usr/share/datasets/fashion-mnist`` (the Debian package ``dataset-fashion-mnist``), then the
cache folder ``~/.cache/qdistill/fashion-mnist``. Users who are online may pass
``download=True`` to fetch the files once into the cache (no test does).
"""

from __future__ import annotations

import gzip
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from qdistill.errors import DataError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path.home() / ".cache" / "qdistill" / "fashion-mnist"
ENV_VAR = "QDISTILL_DATA_DIR"
URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # 0x0803: ubyte, 3 dims; 0x0801: ubyte, 1 dim
SIDE, NUM_CLASSES = 28, 10
MEAN, STD = 0.2860, 0.3530  # of the training images scaled to [0, 1]


def read_idx(path: str | os.PathLike[str], magic: int) -> np.ndarray:
    """Read a gzipped idx file (images: magic 2051, labels: 2049) after checking its header.

    The magic number fixes the element type (unsigned bytes) and the number of dimensions; the
    payload must hold exactly the number of bytes the dimensions promise. Anything else is a
    corrupt or foreign file, reported as :class:`DataError` naming it.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"{path} is corrupt: not a readable gzip idx file ({exc}); delete it and fetch it again"
        ) from None
    if len(raw) < 4 or int.from_bytes(raw[:4], "big") != magic:
        found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        raise DataError(
            f"{path} is corrupt: idx magic number {found}, expected {magic}; "
            "delete it and fetch it again"
        )
    ndim = raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise DataError(f"{path} is corrupt: truncated idx header; delete it and fetch it again")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - offset != expected:
        raise DataError(
            f"{path} is corrupt: {len(raw) - offset} bytes of data for shape {dims} "
            f"({expected} expected); delete it and fetch it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def search_dirs(data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The folders searched for the files, in order of preference."""
    folders = [Path(data_dir).expanduser()] if data_dir else []
    if os.environ.get(ENV_VAR):
        folders.append(Path(os.environ[ENV_VAR]).expanduser())
    return folders + [DEBIAN_DIR, CACHE_DIR]


def find_dir(data_dir: str | os.PathLike[str] | None = None, split: str = "train") -> Path | None:
    """The first searched folder that holds both files of ``split``, or None."""
    for folder in search_dirs(data_dir):
        if all((folder / name).is_file() for name in FILES[split]):
            return folder
    return None


def download_files(target: Path | None = None) -> Path:
    """Fetch the four files into ``target`` (the cache folder); only for users who are online.

    Each file is written to a temporary name in the same folder and renamed into place, so an
    interrupted download never leaves a truncated file that a later run would try to parse.
    """
    target = Path(target) if target is not None else CACHE_DIR
    target.mkdir(parents=True, exist_ok=True)
    for name in FILES["train"] + FILES["test"]:
        dest = target / name
        if dest.is_file():
            continue
        fd, tmp = tempfile.mkstemp(dir=target, prefix=f".{name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(URL + name, timeout=60) as r:
                while chunk := r.read(1 << 20):
                    out.write(chunk)
            os.replace(tmp, dest)
        except (urllib.error.URLError, OSError) as exc:
            raise DataError(
                f"downloading {URL + name} failed ({exc}); install the Debian package "
                "dataset-fashion-mnist or pass --data-dir DIR with the four idx .gz files"
            ) from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


def load_fashion_mnist(
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
) -> TensorDataset:
    """One split as images ``[N, 1, 28, 28]`` (float32, ``(x/255 - 0.2860)/0.3530``), int64 labels.

    Raises :class:`DataError` when the files are missing (naming the folders searched and the
    three ways to get them) or corrupt (naming the file).
    """
    if split not in FILES:
        raise DataError(f"split={split!r}; Fashion-MNIST has the splits {sorted(FILES)}")
    folder = find_dir(data_dir, split)
    if folder is None and download:
        folder = download_files()
    if folder is None:
        searched = ", ".join(str(p) for p in search_dirs(data_dir))
        raise DataError(
            f"Fashion-MNIST not found (searched {searched} for the {split} files); install the "
            "Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist), "
            "pass --data-dir DIR, or download=True when online"
        )
    images_path, labels_path = (folder / name for name in FILES[split])
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if images.shape[1:] != (SIDE, SIDE):
        raise DataError(
            f"{images_path} is corrupt: images of {images.shape[1:]} pixels, expected 28x28"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{labels_path} is corrupt: {len(labels)} labels for {len(images)} images "
            f"in {images_path.name}"
        )
    if len(labels) and int(labels.max()) >= NUM_CLASSES:
        raise DataError(f"{labels_path} is corrupt: label {int(labels.max())} is not in 0..9")
    x = (torch.from_numpy(images.astype(np.float32)) / 255.0 - MEAN) / STD
    return TensorDataset(x.unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
