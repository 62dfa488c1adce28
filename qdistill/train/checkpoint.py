"""Training checkpoints in one safetensors file: model, optimizer and scheduler state.

Tensors go into the safetensors body, everything else (optimizer hyper-parameters, scalar state,
the scheduler, the loop's progress) into one JSON document in its metadata. Nothing is pickled,
so a checkpoint from anywhere can be loaded without running code from it. Writes are atomic.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from qdistill.atomic import atomic_save_safetensors
from qdistill.errors import FileFormatError

META_KEY = "qdistill_checkpoint"
CHECKPOINT_VERSION = 1


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.state.{idx}.{key}"] = value.detach().contiguous().clone()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Atomically write model (+ optimizer, scheduler, ``meta``) state to ``path``."""
    tensors = {f"model.{k}": v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    doc: dict[str, Any] = {"version": CHECKPOINT_VERSION, "meta": meta or {}}
    if optimizer is not None:
        opt_tensors, doc["optimizer"] = _split_optimizer(optimizer.state_dict())
        tensors.update(opt_tensors)
    if scheduler is not None:
        doc["scheduler"] = scheduler.state_dict()
    return atomic_save_safetensors(tensors, path, metadata={META_KEY: json.dumps(doc)})


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns its ``meta``."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"checkpoint {path} does not exist; train without --resume first")
    try:
        with safe_open(str(path), framework="pt") as f:
            doc = json.loads((f.metadata() or {})[META_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except KeyError:
        raise FileFormatError(
            f"{path} is not a qdistill checkpoint (no {META_KEY!r} header); "
            "point --resume at a checkpoint folder written by qd.fit"
        ) from None
    except Exception as exc:
        raise FileFormatError(
            f"{path} is not a readable checkpoint ({exc}); delete it to start over"
        ) from None
    model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(model_state)
    if optimizer is not None and "optimizer" in doc:
        opt = doc["optimizer"]
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim.state."):
                idx, name = key[len("optim.state.") :].split(".", 1)
                state.setdefault(int(idx), {})[name] = value
        for idx, scalars in opt["scalars"].items():
            state.setdefault(int(idx), {}).update(scalars)
        optimizer.load_state_dict({"state": state, "param_groups": opt["param_groups"]})
    if scheduler is not None and "scheduler" in doc:
        scheduler.load_state_dict(doc["scheduler"])
    return doc["meta"]
