"""Data-parallel training on PyTorch's own runtime (``torchrun``, DistributedDataParallel).

What :func:`qdistill.fit` does when a process group is up (or ``torchrun``'s environment says
one should be: ``WORLD_SIZE`` > 1), following the DDP contract of Li et al. (2020), "PyTorch
Distributed: Experiences on Accelerating Data Parallel Training" (VLDB), Sec. 3:

- **Global batch.** A recipe's ``batch_size`` is the *global* batch: each of ``W`` ranks
  loads ``batch_size / W`` examples through a :class:`~torch.utils.data.DistributedSampler`
  (reseeded every epoch with ``set_epoch``; permutation from ``(seed, epoch)`` alone). Rank
  ``r``'s ``k``-th batch holds positions ``r, r+W, ...`` of the epoch's ``k``-th global block,
  so the ranks together see exactly the batch a 1-process run over the same permutation sees,
  and averaging the gradients (DDP's all-reduce) gives that run's gradient. That is why the
  weights match a 1-process run, and why resuming with a different ``W`` continues the same
  run (the data order does not depend on ``W``). A batch size ``W`` does not divide, or fewer
  examples than ranks, is a :class:`~qdistill.errors.ConfigError`.
- **Student** wrapped in ``DistributedDataParallel`` for the forward/backward; checkpoints and
  ``qd.save`` see the unwrapped student. The **teacher** is never wrapped: frozen, eval mode,
  replicated (each rank runs it on its own shard).
- **Quantizer state.** DDP broadcasts rank 0's parameters *and buffers* when it wraps the
  student, so calibrated activation ranges (``act_scale``/``act_zero_point``), fixed weight
  scales (``weight_step``/``weight_zp`` buffers) and BatchNorm statistics start equal
  everywhere. Learned quantizer parameters (LSQ steps, learned points) are ``nn.Parameter``s:
  their gradients are all-reduced like the weights', so the same update keeps them equal
  (the points' projection after each step is deterministic). Buffers that change in training
  (BatchNorm running statistics, also inside ``QuantConvBn2d``) are re-broadcast from rank 0
  before every forward (DDP's ``broadcast_buffers``): rank 0's values win, the others' are
  discarded. Each rank still normalises with its own shard's batch statistics, so a student
  with BatchNorm does not match a 1-process run bit for bit (use ``SyncBatchNorm`` for that).
  Observers only run during calibration, before training. Loss-owned parameters (the
  adapters of ``qd.Intermediate`` hints) get their gradients all-reduced by hand (mean).
- **Randomness.** Every rank seeds torch's RNG with the same ``(seed, epoch)``: stochastic
  rounding of the weights must pick the same codes on every rank, or the ranks' gradients
  would belong to different quantized models.
- **Rank 0 writes**: checkpoints (atomically, then a barrier), metrics, result files.
- **Collectives time out** (``timeout_s``, default 60 s): a rank that never arrives, or dies,
  ends the run with an error instead of a hang.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qdistill.errors import ConfigError

BACKENDS = ("gloo", "nccl")
STRATEGIES = ("ddp", "fsdp")
_STRATEGY: contextvars.ContextVar[str] = contextvars.ContextVar("qdistill_strategy", default="ddp")
DEFAULT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class World:
    """This process's place in the process group."""

    rank: int
    size: int
    backend: str

    @property
    def main(self) -> bool:
        return self.rank == 0


def session_strategy() -> str:
    """The strategy a surrounding :func:`use_strategy` (a recipe run) chose; ``"ddp"``."""
    return _STRATEGY.get()


@contextlib.contextmanager
def use_strategy(name: str) -> Iterator[None]:
    """Make ``name`` (``"ddp"`` or ``"fsdp"``) the default of every ``fit`` in the block."""
    if name not in STRATEGIES:
        raise ConfigError(f"strategy {name!r}; use one of {list(STRATEGIES)}")
    token = _STRATEGY.set(name)
    try:
        yield
    finally:
        _STRATEGY.reset(token)


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when absent)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer; launch with torchrun"
        ) from None


def check_backend(backend: str) -> None:
    """Refuse a backend this machine cannot run, naming the one it can."""
    import torch.distributed as dist

    if backend not in BACKENDS:
        raise ConfigError(f"distributed backend {backend!r}; use one of {list(BACKENDS)}")
    if backend == "nccl" and not (dist.is_nccl_available() and torch.cuda.is_available()):
        raise ConfigError(
            "distributed backend 'nccl' needs CUDA GPUs and a torch built with NCCL, and this "
            "machine has none; use backend gloo (CPU)"
        )
    if backend == "gloo" and not dist.is_gloo_available():
        raise ConfigError("this torch was built without the gloo backend; use nccl on GPUs")


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_from_env(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> World:
    """Join the process group torchrun described in the environment (``env://``), with a
    timeout on the rendezvous and on every collective after it."""
    import torch.distributed as dist

    backend = backend or os.environ.get("QDISTILL_BACKEND") or default_backend()
    check_backend(backend)
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ConfigError(
                f"WORLD_SIZE is set but {missing} are not; launch with torchrun "
                "--nproc_per_node N (it sets them), or unset WORLD_SIZE"
            )
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=float(timeout_s)))
        except (RuntimeError, ValueError) as exc:  # rendezvous timed out, bad address
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(
                f"could not join the process group within {timeout_s:g} s ({first}); check that "
                "every rank was started (torchrun --nproc_per_node) and MASTER_ADDR/PORT"
            ) from None
    return World(dist.get_rank(), dist.get_world_size(), dist.get_backend())


def current(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> World | None:
    """The process group this process is in: an initialised one, one torchrun's environment
    describes (joined here), or ``None`` for a plain single-process run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() == 1:
            return None
        return World(dist.get_rank(), dist.get_world_size(), dist.get_backend())
    if env_world_size() > 1:
        if not dist.is_available():
            raise ConfigError("this torch has no torch.distributed; run with one process")
        return init_from_env(backend, timeout_s)
    return None


def is_main() -> bool:
    """Whether this process writes files: rank 0, or the only process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, world: World | None) -> Any:
    """Rank 0's ``obj`` on every rank (identity without a process group)."""
    if world is None:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce(values: list[float], world: World | None, op: str = "sum") -> list[float]:
    """Element-wise sum (or ``"min"``) of ``values`` over the ranks, in float64."""
    if world is None:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.SUM)
    return t.tolist()


def shard_loader(loader: Any, world: World, seed: int) -> Any:
    """The same data split over the ranks: a DataLoader over ``loader``'s dataset whose
    per-rank batch is ``loader.batch_size / world.size`` (the global batch is kept), through a
    :class:`~torch.utils.data.DistributedSampler` that shuffles iff ``loader`` did."""
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

    if not isinstance(loader, DataLoader) or loader.batch_size is None:
        raise ConfigError(
            f"under torchrun the training data must be a torch DataLoader with a batch_size "
            f"(got {type(loader).__name__}); fit splits its dataset over the {world.size} ranks"
        )
    if isinstance(loader.sampler, DistributedSampler):
        return loader  # already split by the caller
    batch = loader.batch_size
    n = len(loader.dataset)  # type: ignore[arg-type]
    if batch % world.size:
        raise ConfigError(
            f"batch size {batch} cannot be split over {world.size} processes; use a batch size "
            f"divisible by {world.size} (it is the global batch), or another --nproc_per_node"
        )
    if n < world.size:
        raise ConfigError(
            f"{n} training examples cannot be split over {world.size} processes; use more data "
            "or fewer processes"
        )
    sampler = DistributedSampler(
        loader.dataset,
        num_replicas=world.size,
        rank=world.rank,
        shuffle=isinstance(loader.sampler, RandomSampler),
        seed=seed,
        drop_last=False,
    )
    return DataLoader(
        loader.dataset,
        batch_size=batch // world.size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
    )


def eval_shard(loader: Any, world: World) -> Any:
    """Rank ``r``'s share of an evaluation loader: examples ``r, r + W, ...`` in order, no
    padding (each example counted exactly once over the ranks, unlike a DistributedSampler,
    which repeats examples to even the shares out). A loader that is not a DataLoader over a
    sized dataset is evaluated whole on every rank."""
    from torch.utils.data import DataLoader

    if not isinstance(loader, DataLoader) or loader.batch_size is None:
        return loader
    try:
        n = len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        return loader
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=range(world.rank, n, world.size),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
    )


def set_epoch(loader: Any, epoch: int) -> None:
    """Reseed a DistributedSampler (or anything with ``set_epoch``) for this epoch."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def _device(module: nn.Module | None) -> torch.device | None:
    if module is None:
        return None
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else None


def check_devices(run: Any) -> None:
    """Teacher and student must live on the same device (the teacher's logits feed the loss)."""
    t, s = _device(getattr(run, "teacher", None)), _device(run.student)
    if t is not None and s is not None and t != s:
        raise ConfigError(
            f"the teacher is on {t} and the student on {s}; move both to the same device "
            f"(teacher.to({str(s)!r})) before training"
        )


class _StudentDDP(nn.parallel.DistributedDataParallel):
    """DDP whose ``forward`` shows the student's signature, so that token dicts still go in as
    keyword arguments (:func:`qdistill.distill.lm.tokens.call_model` inspects it)."""

    def __init__(self, module: nn.Module, **kwargs: Any) -> None:
        super().__init__(module, **kwargs)
        ddp_forward = super().forward

        def forward(*args: Any, **kw: Any) -> Any:
            return ddp_forward(*args, **kw)

        with contextlib.suppress(TypeError, ValueError):
            forward.__signature__ = inspect.signature(module.forward)  # type: ignore[attr-defined]
        object.__setattr__(self, "forward", forward)


def wrap_student(student: nn.Module, world: World) -> nn.Module:
    """The student inside DistributedDataParallel (rank 0's parameters and buffers are
    broadcast to every rank here)."""
    dev = _device(student)
    ids = [dev] if dev is not None and dev.type == "cuda" else None
    if world.backend == "nccl" and ids is None:
        raise ConfigError("backend nccl needs the student on a CUDA device; use gloo on CPU")
    return _StudentDDP(student, device_ids=ids)  # buffers: broadcast from rank 0 (default)


@contextlib.contextmanager
def forward_through(run: Any, wrapped: nn.Module | None) -> Iterator[None]:
    """Run ``run.step`` with the wrapped student in ``run.student``'s place."""
    if wrapped is None:
        yield
        return
    student = run.student
    run.student = wrapped
    try:
        yield
    finally:
        run.student = student


def extra_grad_sync(params: list[nn.Parameter], world: World | None) -> Any:
    """A hook that averages the gradients of parameters DDP does not own (loss adapters)."""
    if world is None or not params:
        return None
    import torch.distributed as dist

    def sync() -> None:
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(world.size)

    return sync


__all__ = [
    "BACKENDS",
    "World",
    "all_reduce",
    "barrier",
    "broadcast_object",
    "check_backend",
    "check_devices",
    "current",
    "eval_shard",
    "extra_grad_sync",
    "forward_through",
    "init_from_env",
    "is_main",
    "session_strategy",
    "set_epoch",
    "shard_loader",
    "use_strategy",
    "wrap_student",
]
