"""Data sets by name, and the loaders every recipe, the demo and the CLI use.

Every random choice here (which examples a ``subset`` keeps, which ones a validation split
holds out) comes from a private generator seeded by ``seed``, so it never disturbs, and is
never disturbed by, the global RNG that the training loop seeds each epoch to shuffle.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from qdistill.data.digits import load_digits_dataset
from qdistill.data.fashion_mnist import load_fashion_mnist
from qdistill.errors import ConfigError

DATASETS: dict[str, dict[str, Any]] = {
    "fashion-mnist": {"input_shape": (1, 28, 28), "num_classes": 10},
    "digits": {"input_shape": (1, 8, 8), "num_classes": 10},
}


def get_dataset(name: str, split: str, data_dir: str | os.PathLike[str] | None = None) -> Dataset:
    """One split (``train`` or ``test``) of a named data set; ``data_dir`` is for fashion-mnist."""
    if name == "fashion-mnist":
        return load_fashion_mnist(split, data_dir=data_dir)
    if name == "digits":
        return load_digits_dataset(split)
    raise ConfigError(f"unknown dataset {name!r}; known datasets: {sorted(DATASETS)}")


def _permutation(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def _subset(ds: Dataset, n: int | None, seed: int) -> Dataset:
    """The first ``n`` examples of a fixed seeded permutation of ``ds`` (all of it if None)."""
    size = len(ds)  # type: ignore[arg-type]
    if n is None or n >= size:
        return ds
    return Subset(ds, _permutation(size, seed)[:n])


def _holdout(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Split ``ds`` into (rest, held-out ``fraction``) by a fixed seeded permutation."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"validation fraction {fraction}; choose a value between 0 and 1")
    order = _permutation(len(ds), seed)  # type: ignore[arg-type]
    n_val = max(1, int(len(order) * fraction))
    if n_val >= len(order):
        raise ConfigError(f"validation fraction {fraction} leaves no training examples")
    return Subset(ds, order[n_val:]), Subset(ds, order[:n_val])


def make_loaders(
    name: str,
    batch_size: int = 128,
    data_dir: str | os.PathLike[str] | None = None,
    subset: int | None = None,
    eval_batch_size: int = 1000,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """``(train_loader, test_loader)`` for a named data set.

    * ``subset``: keep the first ``subset`` examples of a fixed seeded permutation of the
      training split and, separately, of the test split (for quick runs).
    * ``val_fraction`` > 0: hold out that fraction of the (subset) training examples and return
      it *in place of* the test loader, so options can be compared without looking at test.
    * The train loader shuffles with the global RNG (no generator of its own): the training loop
      seeds it each epoch, which makes a resumed run see the same batches. ``num_workers=0``.
    """
    if batch_size < 1 or eval_batch_size < 1:
        raise ConfigError(f"batch sizes must be >= 1 (got {batch_size}, {eval_batch_size})")
    if subset is not None and subset < 1:
        raise ConfigError(f"subset={subset}; use a positive number of examples or None")
    train = _subset(get_dataset(name, "train", data_dir), subset, seed)
    if val_fraction:
        train, evaluation = _holdout(train, val_fraction, seed + 1)
    else:
        evaluation = _subset(get_dataset(name, "test", data_dir), subset, seed)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, num_workers=0),
        DataLoader(evaluation, batch_size=eval_batch_size, shuffle=False, num_workers=0),
    )


def split_validation(
    train_loader: DataLoader, fraction: float = 0.1, seed: int = 0, eval_batch_size: int = 1000
) -> tuple[DataLoader, DataLoader]:
    """Hold out a fixed random ``fraction`` of a loader's data for choosing between options.

    Returns ``(train_loader over the rest, validation loader)``; the first keeps the original
    batch size and shuffles with the global RNG like :func:`make_loaders`.
    """
    rest, val = _holdout(train_loader.dataset, fraction, seed)
    return (
        DataLoader(rest, batch_size=train_loader.batch_size, shuffle=True, num_workers=0),
        DataLoader(val, batch_size=eval_batch_size, shuffle=False, num_workers=0),
    )
