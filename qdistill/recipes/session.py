"""One recipe run as a session: the process group (under torchrun) and the experiment log.

Every rank runs the same recipe code on the same data, the training inside it data-parallel
(:mod:`qdistill.train.distributed`). Rank 0 writes the recipe's ``output`` folder: checkpoints,
``metrics.jsonl`` (and TensorBoard / W&B logs when asked for), the packed model and
``metrics.json``. The other ranks compute the same results and write them into a scratch
folder that is deleted when they finish, so no recipe needs a rank check of its own and no two
processes ever write one file. Resuming reads rank 0's checkpoints on every rank.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any

from qdistill.recipes.config import RecipeConfig
from qdistill.train import distributed as dist
from qdistill.train.tracking import experiment


def with_overrides(
    config: RecipeConfig,
    *,
    tensorboard: bool | None = None,
    wandb: bool | None = None,
    backend: str | None = None,
) -> RecipeConfig:
    """``config`` with the command line's ``--tensorboard``, ``--wandb`` and ``--backend``
    (a flag given wins over the recipe's key; one not given leaves it)."""
    log = config.logging
    if tensorboard:
        log = dataclasses.replace(log, tensorboard=True)
    if wandb:
        log = dataclasses.replace(log, wandb=True)
    dis = config.distributed
    if backend is not None:
        dist.check_backend(backend)
        dis = dataclasses.replace(dis, backend=backend)
    return dataclasses.replace(config, logging=log, distributed=dis)


def run_session(
    config: RecipeConfig, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Run ``config`` (joining torchrun's process group when launched by it); returns the
    recipe's metrics (the same on every rank)."""
    import torch.distributed as tdist

    d = config.distributed
    if d.backend is not None:
        dist.check_backend(d.backend)  # asking for nccl where there is none: say so, always
    joined_here = not (tdist.is_available() and tdist.is_initialized())
    world = dist.current(d.backend, d.timeout_s)
    joined_here = joined_here and world is not None
    main = world is None or world.main
    scratch = None
    if not main:
        scratch = tempfile.mkdtemp(prefix=f"qdistill-rank{world.rank}-")  # type: ignore[union-attr]
        config = dataclasses.replace(config, output=scratch)
    try:
        log = config.logging
        with (
            dist.use_strategy(d.strategy),
            experiment(
                Path(config.output) if main else None,
                tensorboard=log.tensorboard,
                wandb=log.wandb,
                wandb_project=log.wandb_project,
            ),
        ):
            metrics = config.run(resume=resume, progress=progress and main)
        dist.barrier()  # rank 0's files are complete when any rank returns
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        if joined_here:
            tdist.destroy_process_group()
    return metrics


__all__ = ["run_session", "with_overrides"]
