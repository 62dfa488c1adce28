"""Data sets that load offline (Debian package files, scikit-learn) and their loaders."""

from qdistill.data.digits import load_digits_dataset
from qdistill.data.distilled import bn_statistics_loss, distilled_data, distilled_loader
from qdistill.data.fashion_mnist import load_fashion_mnist, read_idx
from qdistill.data.loaders import DATASETS, get_dataset, make_loaders, split_validation

__all__ = [
    "DATASETS",
    "bn_statistics_loss",
    "distilled_data",
    "distilled_loader",
    "get_dataset",
    "load_digits_dataset",
    "load_fashion_mnist",
    "make_loaders",
    "read_idx",
    "split_validation",
]
