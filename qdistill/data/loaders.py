"""Data sets by name, and the loaders every recipe uses."""

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
    """One split of a named data set (``fashion-mnist`` or ``digits``)."""
    if name == "fashion-mnist":
        return load_fashion_mnist(split, data_dir=data_dir)
    if name == "digits":
        return load_digits_dataset(split)
    raise ConfigError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")


def _subset(ds: Dataset, n: int | None, seed: int) -> Dataset:
    if n is None or n >= len(ds):  # type: ignore[arg-type]
        return ds
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))  # type: ignore[arg-type]
    return Subset(ds, order[:n].tolist())


def make_loaders(
    name: str,
    batch_size: int = 128,
    data_dir: str | os.PathLike[str] | None = None,
    subset: int | None = None,
    eval_batch_size: int = 1000,
    seed: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """Train loader (shuffled by the global RNG, which ``fit`` seeds per epoch) and test loader.

    ``subset`` keeps a fixed random ``subset`` training examples and ``subset // 3`` test ones.
    """
    train = _subset(get_dataset(name, "train", data_dir), subset, seed)
    test = _subset(get_dataset(name, "test", data_dir), subset // 3 if subset else None, seed)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, num_workers=0),
        DataLoader(test, batch_size=eval_batch_size, shuffle=False, num_workers=0),
    )


def split_validation(
    train_loader: DataLoader, fraction: float = 0.1, seed: int = 0, eval_batch_size: int = 1000
) -> tuple[DataLoader, DataLoader]:
    """Hold out a fixed random ``fraction`` of the training data for choosing between options."""
    ds = train_loader.dataset
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()  # type: ignore[arg-type]
    n_val = max(1, int(len(order) * fraction))
    train = DataLoader(Subset(ds, order[n_val:]), batch_size=train_loader.batch_size, shuffle=True)
    val = DataLoader(Subset(ds, order[:n_val]), batch_size=eval_batch_size, shuffle=False)
    return train, val
