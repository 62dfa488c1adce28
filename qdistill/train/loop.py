"""One training loop for every recipe: progress bar, per-epoch evaluation, checkpoints, resume.

Resuming is exact: every epoch starts by seeding torch's global RNG from ``(seed, epoch)``, so
data shuffling (a DataLoader without its own generator), dropout and stochastic rounding in
epoch ``k`` do not depend on what ran before; with the model and optimizer state restored from
the end of epoch ``k - 1``, a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from qdistill.distill.lm.metrics import batch_counts, default_shift
from qdistill.distill.lm.tokens import call_model, split_batch
from qdistill.errors import ConfigError, FileFormatError, TrainingError
from qdistill.train import distributed as dist
from qdistill.train import fsdp
from qdistill.train.checkpoint import load_checkpoint, save_checkpoint
from qdistill.train.tracking import MetricsLogger, active_logger

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.safetensors"
NONFINITE_POLICIES = ("stop", "skip")
Callback = Callable[[str, dict[str, Any]], None]


@dataclass
class History:
    """Per-epoch figures of one training run."""

    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)

    @property
    def final_val_acc(self) -> float | None:
        return self.val_acc[-1] if self.val_acc else None

    def to_dict(self) -> dict[str, list[float]]:
        return asdict(self)


def evaluate(model: nn.Module | Any, loader: Iterable) -> float:
    """Top-1 accuracy of ``model`` on ``loader`` (eval mode, no gradients; mode restored).

    Batches are ``(x, y)`` pairs or token dicts; for a language model it is the next-token
    accuracy over the unpadded tokens (see :mod:`qdistill.distill.lm.metrics`).
    """
    correct, total = _eval_counts(model, loader)
    return correct / max(total, 1)


def _eval_counts(model: nn.Module | Any, loader: Iterable) -> tuple[int, int]:
    """Correct predictions and counted items (samples, or unpadded tokens) on ``loader``."""
    net = getattr(model, "student", model)
    shift = default_shift(model)
    was_training = net.training
    net.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in loader:
            x, y = split_batch(batch)
            n, ok = batch_counts(call_model(net, x), y, x, shift)
            correct += ok
            total += n
    net.train(was_training)
    return correct, total


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    clip_grad_norm: float | None = None,
    after_backward: Callable[[], None] | None = None,
) -> None:
    """Backward ``loss`` and step ``optimizer``, clipping the gradients' global norm first
    (over every parameter the optimizer steps) when ``clip_grad_norm`` is given.
    ``after_backward`` runs between backward and clipping (e.g. a gradient all-reduce)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if after_backward is not None:
        after_backward()
    if clip_grad_norm is not None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
    optimizer.step()


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def _start(
    run: Any,
    ckpt: Path | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    resume: bool,
    seed: int,
    epochs: int,
    desc: str,
    main: bool = True,
) -> tuple[History, int]:
    """History so far and the first epoch to run: restored from ``ckpt`` when resuming
    (warnings from rank 0 only under torchrun)."""
    warn = log.warning if main else log.debug
    if ckpt is None:
        if resume:
            warn("%s: resume asked for but no checkpoint_dir given; starting fresh", desc)
        return History(), 0
    if not ckpt.exists():
        if resume:
            warn("%s: no checkpoint at %s to resume from; starting fresh", desc, ckpt)
        return History(), 0
    if not resume:
        warn("%s: starting fresh; the checkpoint %s will be overwritten", desc, ckpt)
        return History(), 0
    model = getattr(run, "checkpoint_model", run.student)  # the student (+ loss adapters)
    meta = load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler)
    done, history = _progress(meta, ckpt)
    if meta.get("seed", seed) != seed:
        warn(
            "%s: checkpoint was trained with seed=%s, this run uses seed=%s; the resumed run "
            "will not match an uninterrupted one",
            desc,
            meta["seed"],
            seed,
        )
    if done + 1 >= epochs:
        warn("%s: checkpoint %s already holds %d epochs; nothing to train", desc, ckpt, done + 1)
    else:
        warn("%s: resuming from epoch %d/%d (%s)", desc, done + 2, epochs, ckpt)
    return history, done + 1


def _progress(meta: Any, ckpt: Path) -> tuple[int, History]:
    """The last finished epoch and the history a checkpoint's meta records, checked: a tampered
    epoch (negative, not an integer) or history (not one entry per epoch) is a clear error."""
    fix = "it was not written by fit or was edited; delete it or train without resume"
    try:
        done = meta["epoch"]
        history = History(**meta.get("history", {}))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise FileFormatError(f"{ckpt} has no training progress (epoch, history); {fix}") from None
    if isinstance(done, bool) or not isinstance(done, int) or done < 0:
        raise FileFormatError(f"{ckpt} records epoch {done!r}, not an integer >= 0; {fix}")
    if len(history.train_loss) != done + 1:
        raise FileFormatError(
            f"{ckpt} records {len(history.train_loss)} epochs of losses for epoch {done}; {fix}"
        )
    return done, history


def _finite_loss(
    loss: torch.Tensor,
    policy: str,
    desc: str,
    epoch: int,
    step: int,
    world: dist.World | None = None,
) -> bool:
    """Whether to use this batch's loss: True if finite; a non-finite one skips the batch
    (``policy="skip"``, with a warning) or stops training, naming the step (``"stop"``).
    Under DDP the ranks decide together (one non-finite shard skips or stops the step on every
    rank; otherwise the others would wait forever in the gradient all-reduce)."""
    finite = bool(torch.isfinite(loss.detach()).all())
    if world is not None:
        finite = dist.all_reduce([float(finite)], world, op="min")[0] > 0
    if finite:
        return True
    value = float(loss.detach().float().sum())
    where = f"{desc}: the loss is {value} at epoch {epoch + 1}, step {step}"
    if policy == "skip":
        log.warning("%s; batch skipped (on_nonfinite='skip')", where)
        return False
    raise TrainingError(
        f"{where}; training stopped before the weights or a checkpoint took it in (lower the "
        "learning rate, check the data, or pass on_nonfinite='skip' to drop such batches)"
    )


def _check_weights(run: Any, desc: str, epoch: int) -> None:
    """Refuse to checkpoint or return weights that are no longer finite."""
    for name, p in run.student.state_dict().items():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise TrainingError(
                f"{desc}: weight {name!r} is NaN or Inf after epoch {epoch + 1}; training "
                "diverged (lower the learning rate); nothing was checkpointed for this epoch"
            )


def fit(
    run: Any,
    train_loader: Iterable,
    *,
    epochs: int,
    val_loader: Iterable | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 1e-3,
    scheduler: Any = None,
    scheduler_interval: str = "epoch",
    clip_grad_norm: float | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    seed: int = 0,
    progress: bool = True,
    callbacks: list[Callback] | None = None,
    desc: str = "train",
    on_nonfinite: str = "stop",
    logger: MetricsLogger | None = None,
    strategy: str | None = None,
) -> History:
    """Train ``run`` (a :class:`~qdistill.distill.Distiller`) for ``epochs`` epochs.

    ``run`` needs ``.step(x, y) -> (loss, logits)``, ``.train()``, ``.eval()``, ``.parameters()``
    and ``.student``. The optimizer defaults to ``Adam(run.parameters(), lr)``; ``scheduler`` is
    stepped once per epoch, or once per optimizer step with ``scheduler_interval="step"`` (e.g.
    :func:`qdistill.train.schedule.warmup_decay`); ``clip_grad_norm`` clips the gradients'
    global norm before every step. A checkpoint (student, optimizer, scheduler, epoch, seed,
    history) is written atomically to ``checkpoint_dir/last.safetensors`` after every epoch;
    ``resume=True`` continues after the epoch it holds, with the same result as a run that was
    never stopped (same ``seed``, data and settings assumed). ``resume=False`` starts fresh and
    overwrites it.
    ``callbacks`` are called as ``cb(event, info)``: ``"step"`` after every optimizer step
    (info: epoch, step) and ``"epoch_end"`` after the checkpoint (info: epoch, history).
    A non-finite loss stops training with a :class:`~qdistill.errors.TrainingError` naming the
    epoch and step (``on_nonfinite="stop"``, the default) or skips that batch (``"skip"``);
    weights that became non-finite are never checkpointed. The student is left in eval mode.

    Metrics go to ``logger``, else to the logger of a surrounding
    :func:`qdistill.train.tracking.experiment` (a recipe run), else to
    ``checkpoint_dir/metrics.jsonl``: one JSON line per step (loss, lr) and per epoch
    (train_loss, train_acc, val_acc), tagged ``stage=desc``.

    Under ``torchrun`` (an initialised process group, or ``WORLD_SIZE`` > 1 in the
    environment) the student trains data-parallel with DistributedDataParallel, the loader's
    batch being the global batch split over the ranks; only rank 0 writes checkpoints and
    metrics; see :mod:`qdistill.train.distributed` for what is kept consistent and how.
    ``strategy="fsdp"`` (default: the recipe's ``distributed.strategy``, else ``"ddp"``)
    shards the student's parameters and optimizer state instead (FSDP2, :mod:`.fsdp`).
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs={epochs!r} must be a positive integer")
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ConfigError(f"on_nonfinite={on_nonfinite!r}; use one of {NONFINITE_POLICIES}")
    if scheduler_interval not in ("epoch", "step"):
        raise ConfigError(f"scheduler_interval={scheduler_interval!r}; use 'epoch' or 'step'")
    dist.check_devices(run)
    strategy = strategy or dist.session_strategy()
    if strategy not in dist.STRATEGIES:
        raise ConfigError(f"strategy={strategy!r}; use one of {list(dist.STRATEGIES)}")
    world = dist.current()
    main = world is None or world.main
    sharding = world is not None and strategy == "fsdp"
    if sharding:
        fsdp.check_supported(run, optimizer, scheduler, callbacks)
    if world is not None:
        train_loader = dist.shard_loader(train_loader, world, seed)
    if optimizer is None:
        optimizer = torch.optim.Adam(run.parameters(), lr=lr)
    per_step = scheduler if scheduler_interval == "step" else None
    ckpt = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    ckpt = dist.broadcast_object(ckpt, world)  # every rank resumes from rank 0's checkpoint
    history, start = _start(run, ckpt, optimizer, scheduler, resume, seed, epochs, desc, main)
    shift = default_shift(run)
    sharded = None
    if sharding:  # the plain optimizer above only carried a resumed state over
        sharded = fsdp.ShardedStudent(run.student, lr)
        if optimizer.state:
            sharded.load_optimizer_state(optimizer.state_dict())
        optimizer = sharded.optimizer
        wrapped: nn.Module | None = sharded.module
        sync = None
    else:
        wrapped = dist.wrap_student(run.student, world) if world is not None else None
        student_params = {id(p) for p in run.student.parameters()}
        extra = [
            p for g in optimizer.param_groups for p in g["params"] if id(p) not in student_params
        ]
        sync = dist.extra_grad_sync(extra, world)
    progress = progress and main

    own_logger = None
    if not main:
        logger = None
    elif logger is None:
        logger = active_logger()
        if logger is None and checkpoint_dir is not None:
            logger = own_logger = MetricsLogger(Path(checkpoint_dir))
    steps_per_epoch = _length(train_loader)
    try:
        for epoch in range(start, epochs):
            torch.manual_seed(_epoch_seed(seed, epoch))
            dist.set_epoch(train_loader, epoch)
            run.train()
            total_loss = correct = seen = 0.0
            skipped = 0
            bar = tqdm(
                train_loader,
                desc=f"{desc} {epoch + 1}/{epochs}",
                disable=not progress,
                leave=False,
            )
            for step, batch in enumerate(bar):
                x, y = split_batch(batch)  # (x, y) pairs or token dicts
                with dist.forward_through(run, wrapped):
                    loss, logits = run.step(x, y)
                if not _finite_loss(loss, on_nonfinite, desc, epoch, step, world):
                    skipped += 1
                    continue
                optimizer_step(optimizer, loss, clip_grad_norm, after_backward=sync)
                if per_step is not None:
                    per_step.step()
                n, ok = batch_counts(logits.detach(), y, x, shift)  # samples, or counted tokens
                total_loss += float(loss.detach()) * n
                correct += ok
                seen += n
                bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
                if logger is not None:
                    logger.log(
                        {
                            "event": "step",
                            "stage": desc,
                            "epoch": epoch,
                            "step": step,
                            "global_step": epoch * steps_per_epoch + step
                            if steps_per_epoch
                            else None,
                            "loss": float(loss.detach()),
                            "lr": float(optimizer.param_groups[0]["lr"]),
                        }
                    )
                for cb in callbacks or ():
                    cb("step", {"epoch": epoch, "step": step})
            total_loss, correct, seen, skipped = dist.all_reduce(
                [total_loss, correct, seen, skipped], world
            )  # the epoch's figures over every rank's shard
            if seen == 0 and skipped:
                raise TrainingError(
                    f"{desc}: every batch of epoch {epoch + 1} had a non-finite loss"
                )
            if sharded is not None:
                sharded.sync_to(run.student)  # the full weights, on every rank
            _check_weights(run, desc, epoch)
            if scheduler is not None and per_step is None:
                scheduler.step()
            history.train_loss.append(total_loss / max(seen, 1))
            history.train_acc.append(correct / max(seen, 1))
            if val_loader is not None:
                history.val_acc.append(_val_acc(run.student, val_loader, world))
            if progress:
                val = f", val acc {history.val_acc[-1]:.4f}" if val_loader is not None else ""
                tqdm.write(
                    f"{desc} epoch {epoch + 1}/{epochs}: loss {history.train_loss[-1]:.4f}, "
                    f"train acc {history.train_acc[-1]:.4f}{val}"
                )
            if logger is not None:
                logger.log(
                    {
                        "event": "epoch",
                        "stage": desc,
                        "epoch": epoch,
                        "train_loss": history.train_loss[-1],
                        "train_acc": history.train_acc[-1],
                        "val_acc": history.val_acc[-1] if val_loader is not None else None,
                        "skipped": int(skipped),
                        "world_size": world.size if world is not None else 1,
                    }
                )
            opt_state: Any = optimizer
            if ckpt is not None and sharded is not None:  # gathered by every rank
                opt_state = fsdp.StateOf(sharded.optimizer_state())
            if ckpt is not None and main:
                save_checkpoint(
                    ckpt,
                    model=getattr(run, "checkpoint_model", run.student),
                    optimizer=opt_state,
                    scheduler=scheduler,
                    meta={"epoch": epoch, "seed": seed, "history": history.to_dict()},
                )
            dist.barrier()  # no rank runs ahead of (or resumes from) a half-written epoch
            for cb in callbacks or ():
                cb("epoch_end", {"epoch": epoch, "history": history})
    finally:
        if own_logger is not None:
            own_logger.close()
    run.eval()
    return history


def _val_acc(student: nn.Module, loader: Iterable, world: dist.World | None) -> float:
    """Validation accuracy; under torchrun each rank counts its share of the data
    (:func:`~qdistill.train.distributed.eval_shard`) and the counts are summed."""
    if world is None:
        return evaluate(student, loader)
    correct, total = _eval_counts(student, dist.eval_shard(loader, world))
    correct, total = dist.all_reduce([correct, total], world)
    return correct / max(total, 1)


def _length(loader: Iterable) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None
