"""scikit-learn's 8x8 handwritten digits: 1,797 images shipped inside scikit-learn.

Small enough that a whole train-quantize-distill pipeline runs in seconds, which is what the
tests and the quick recipes need; no download, no Debian package.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from qdistill.errors import DataError

SPLITS = ("train", "test")
PIXEL_MEAN, PIXEL_STD = 4.88, 6.02  # of all 1,797 images (pixel values 0..16)


def load_digits_dataset(
    split: str = "train", test_fraction: float = 0.25, seed: int = 0
) -> TensorDataset:
    """One split as images ``[N, 1, 8, 8]`` (float32, about zero mean and unit std), int64 labels.

    The split is a random permutation drawn from ``seed`` alone, so ``train`` and ``test`` are
    disjoint, together cover the data set, and are the same on every run and machine.
    """
    if split not in SPLITS:
        raise DataError(f"split={split!r}; digits has the splits {list(SPLITS)}")
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction={test_fraction}; choose a fraction between 0 and 1")
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError(
            "the digits data set needs scikit-learn: pip install scikit-learn "
            "(or use the fashion-mnist data set)"
        ) from None
    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8)
    x = (x - PIXEL_MEAN) / PIXEL_STD
    y = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(y) * test_fraction))
    idx = order[:n_test] if split == "test" else order[n_test:]
    return TensorDataset(x[idx], y[idx])
