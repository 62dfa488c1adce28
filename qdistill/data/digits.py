"""scikit-learn's 8x8 handwritten digits: tiny, shipped inside the package, for fast tests."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from qdistill.errors import DataError


def load_digits_dataset(
    split: str = "train", test_fraction: float = 0.25, seed: int = 0
) -> TensorDataset:
    """Images ``[N, 1, 8, 8]`` standardised, int64 labels; a fixed seeded train/test split."""
    if split not in ("train", "test"):
        raise DataError(f"split={split!r}; digits has splits ['test', 'train']")
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError(
            "the digits data set needs scikit-learn: pip install scikit-learn"
        ) from None
    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8)
    x = (x - 4.88) / 6.02  # the data set's mean and std (pixel values 0..16)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(y) * test_fraction))
    idx = order[:n_test] if split == "test" else order[n_test:]
    return TensorDataset(x[idx], y[idx])
