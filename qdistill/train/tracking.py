"""Experiment logging: metrics as JSON lines in the run folder, always; TensorBoard and
Weights & Biases (offline) on request.

Every record is one JSON object per line in ``RUN_DIR/metrics.jsonl`` (appended, flushed per
line, so a killed run keeps what it logged and a resumed one appends after it). Records carry
``event`` (``"step"`` or ``"epoch"``), ``stage`` (the ``desc`` of the :func:`~qdistill.fit`
call: ``teacher``, ``student``...), ``epoch`` (0-based), ``step``/``global_step`` for step
records, the figures :func:`~qdistill.fit` tracks (``loss``, ``lr``; ``train_loss``,
``train_acc``, ``val_acc``) and ``time`` (Unix seconds). A resumed run repeats the epoch it
was killed in, so a reader keeps the *last* record of each ``(stage, event, epoch, step)``
(:func:`read_jsonl` with ``dedupe=True`` does).

TensorBoard (``torch.utils.tensorboard``, needs the ``tensorboard`` package) and W&B (the
``wandb`` package, run with ``mode="offline"``: nothing leaves the machine) are opt-in sinks
beside the JSONL file; asking for one that is not installed is a :class:`ConfigError` naming
the package to install, raised before any training starts.

A recipe run activates one logger for everything it trains (:func:`experiment`); ``fit``
picks it up, otherwise it writes ``metrics.jsonl`` next to its checkpoint.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qdistill.errors import ConfigError, FileFormatError

METRICS_FILE = "metrics.jsonl"

_ACTIVE: contextvars.ContextVar[MetricsLogger | None] = contextvars.ContextVar(
    "qdistill_metrics_logger", default=None
)


def _tensorboard_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "TensorBoard logging was asked for but the 'tensorboard' package is not installed; "
            "pip install tensorboard, or drop logging.tensorboard / --tensorboard"
        ) from None
    return SummaryWriter


def _wandb_module() -> Any:
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            "Weights & Biases logging was asked for but the 'wandb' package is not installed; "
            "pip install wandb, or drop logging.wandb / --wandb"
        ) from None
    return wandb


def _clean(value: Any) -> Any:
    """JSON-safe: floats that are not finite become null (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class MetricsLogger:
    """Writes records to ``run_dir/metrics.jsonl`` and to the sinks asked for."""

    run_dir: Path
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "qdistill"
    _fh: Any = field(default=None, init=False, repr=False)
    _tb: Any = field(default=None, init=False, repr=False)
    _wb: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        # a sink asked for but not installed fails before anything is written
        writer = _tensorboard_class() if self.tensorboard else None
        wandb = _wandb_module() if self.wandb else None
        if writer is not None:
            self._tb = writer(log_dir=str(self.run_dir / "tensorboard"))
        if wandb is not None:  # offline: the run is stored under run_dir/wandb, not uploaded
            self._wb = wandb.init(
                project=self.wandb_project,
                name=self.run_dir.name,
                dir=str(self.run_dir),
                mode="offline",
            )

    @property
    def path(self) -> Path:
        return self.run_dir / METRICS_FILE

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (a JSON line; numbers also go to the sinks, keyed by stage)."""
        record = {k: _clean(v) for k, v in record.items()}
        record.setdefault("time", round(time.time(), 3))
        if self._fh is None:  # the folder and file appear with the first record
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8", buffering=1)
        self._fh.write(json.dumps(record) + "\n")
        numbers = {
            f"{record.get('stage', 'train')}/{k}": v
            for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k not in ("epoch", "step", "global_step", "time")
        }  # fmt: skip
        if not numbers:
            return
        x = record.get("global_step") if record.get("event") == "step" else record.get("epoch")
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, global_step=x)
        if self._wb is not None:
            self._wb.log(numbers)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wb is not None:
            self._wb.finish()
            self._wb = None


def active_logger() -> MetricsLogger | None:
    """The logger a surrounding :func:`experiment` opened, if any."""
    return _ACTIVE.get()


@contextlib.contextmanager
def experiment(
    run_dir: str | os.PathLike[str] | None,
    *,
    tensorboard: bool = False,
    wandb: bool = False,
    wandb_project: str = "qdistill",
) -> Iterator[MetricsLogger | None]:
    """Log every ``fit`` inside the block to ``run_dir`` (``None``, e.g. on ranks other than
    0 of a distributed run: log nothing)."""
    if run_dir is None:
        token = _ACTIVE.set(None)
        try:
            yield None
        finally:
            _ACTIVE.reset(token)
        return
    logger = MetricsLogger(
        Path(run_dir), tensorboard=tensorboard, wandb=wandb, wandb_project=wandb_project
    )
    token = _ACTIVE.set(logger)
    try:
        yield logger
    finally:
        _ACTIVE.reset(token)
        logger.close()


def read_jsonl(path: str | os.PathLike[str], dedupe: bool = True) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file; ``dedupe`` keeps the last record of each
    ``(stage, event, epoch, step)`` (a resumed run re-logs the epoch it was killed in), in the
    order of their last appearance. A torn last line (a kill mid-write) is ignored."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    records: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise FileFormatError(f"{path} line {i + 1} is not JSON; the file was edited") from None
        if isinstance(rec, dict):
            records.append(rec)
    if not dedupe:
        return records
    last: dict[tuple[Any, ...], dict[str, Any]] = {}
    for rec in records:
        key = (rec.get("stage"), rec.get("event"), rec.get("epoch"), rec.get("step"))
        last.pop(key, None)
        last[key] = rec
    return list(last.values())


__all__ = [
    "METRICS_FILE",
    "MetricsLogger",
    "active_logger",
    "experiment",
    "read_jsonl",
]
