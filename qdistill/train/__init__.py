"""The training loop: progress bar, atomic checkpoints, exact resume."""

from qdistill.train.checkpoint import load_checkpoint, save_checkpoint
from qdistill.train.loop import History, evaluate, fit

__all__ = ["History", "evaluate", "fit", "load_checkpoint", "save_checkpoint"]
