"""FSDP2 (``fully_shard``) for :func:`qdistill.fit`: the student's parameters and optimizer
state sharded over the ranks (Zhao et al. 2023, "PyTorch FSDP: Experiences on Scaling Fully
Sharded Data Parallel", VLDB; the per-parameter ``DTensor`` sharding of torch's FSDP2).

``fit(..., strategy="fsdp")`` (recipe ``distributed: {strategy: fsdp}``) trains a sharded
*copy* of the student: every module that owns parameters (each quantized layer, with its LSQ
step or learned points) is one FSDP unit, then the root. Before each forward FSDP all-gathers a
unit's parameters, so the fake-quant code sees whole weights; gradients are reduce-scattered
(averaged), so each rank updates its shard with the gradient of the global batch, the same
update DDP makes. Buffers are not sharded and FSDP does not synchronise them: rank 0's student
(parameters and buffers: calibrated activation ranges, BatchNorm statistics) is broadcast before
sharding, and rank 0's buffers again at every epoch end.

At every epoch end the full state is gathered into ``run.student`` (the caller's plain module,
on every rank), so evaluation, callbacks at ``epoch_end``, checkpoints and ``qd.save`` after
training see ordinary tensors, and a checkpoint (the optimizer state re-indexed like a plain
``Adam``'s) resumes under any strategy and number of processes.

Not supported yet (a :class:`~qdistill.errors.ConfigError` says so): a caller's optimizer or
scheduler (they would hold the unsharded parameters; fit builds Adam after sharding), losses
that own parameters or hooks (``qd.Intermediate``), and callbacks (a step callback would see
the unsharded copy, not the weights being trained).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from qdistill.errors import ConfigError


def check_supported(run: Any, optimizer: Any, scheduler: Any, callbacks: Any) -> None:
    """Refuse what the FSDP path does not handle yet, naming it and the way around."""
    why = None
    if optimizer is not None or scheduler is not None:
        why = "a caller's optimizer or scheduler (fit builds Adam after sharding; pass lr)"
    elif callbacks:
        why = "callbacks (they would see the unsharded copy of the student)"
    elif getattr(run, "checkpoint_model", run.student) is not run.student or hasattr(
        getattr(run, "loss", None), "capture"
    ):
        why = "losses with their own parameters or layer hooks (qd.Intermediate)"
    if why is not None:
        raise ConfigError(f"strategy 'fsdp' does not support {why} yet; use strategy 'ddp'")


def _broadcast(tensors: Any) -> None:
    import torch.distributed as dist

    for t in tensors:
        dist.broadcast(t.data, src=0)


class ShardedStudent:
    """A ``fully_shard``-ed copy of ``student`` and its optimizer."""

    def __init__(self, student: nn.Module, lr: float) -> None:
        from torch.distributed.fsdp import fully_shard

        with torch.no_grad():
            _broadcast(student.state_dict().values())  # rank 0's parameters and buffers
        self.module = copy.deepcopy(student)
        for m in list(self.module.modules()):
            if m is not self.module and any(True for _ in m.parameters(recurse=False)):
                fully_shard(m)
        fully_shard(self.module)
        self.names = [n for n, p in self.module.named_parameters() if p.requires_grad]
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=lr)

    def _options(self) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True)  # gathered on every rank

    def sync_to(self, student: nn.Module) -> None:
        """Gather the full state into ``student`` (collective: every rank calls it)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        with torch.no_grad():
            _broadcast(self.module.buffers())  # rank 0's running statistics win
        student.load_state_dict(get_model_state_dict(self.module, options=self._options()))

    def optimizer_state(self) -> dict[str, Any]:
        """The full optimizer state, indexed 0.. like a plain ``Adam`` over the student's
        trainable parameters (collective)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        osd = get_optimizer_state_dict(self.module, self.optimizer, options=self._options())
        index = {name: i for i, name in enumerate(self.names)}
        groups = [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]
        return {"state": {index[n]: s for n, s in osd["state"].items()}, "param_groups": groups}

    def load_optimizer_state(self, plain: dict[str, Any]) -> None:
        """Shard a plain (index-keyed, full) optimizer state into this optimizer."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        names = self.names
        osd = {
            "state": {names[int(i)]: s for i, s in plain["state"].items()},
            "param_groups": [
                {**g, "params": [names[int(i)] for i in g["params"]]} for g in plain["param_groups"]
            ],
        }
        set_optimizer_state_dict(self.module, self.optimizer, osd, options=self._options())


class StateOf:
    """Anything with a ``state_dict()`` returning a fixed dict (for ``save_checkpoint``)."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


__all__ = ["ShardedStudent", "StateOf", "check_supported"]
