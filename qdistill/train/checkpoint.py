"""Training checkpoints in one safetensors file: model, optimizer and scheduler state.

Tensors go into the safetensors body (``model.<key>`` and ``optim.state.<param index>.<key>``),
everything else (optimizer hyper-parameters, scalar state, the scheduler, the loop's progress)
into one JSON document under the metadata key ``qdistill_checkpoint``. Nothing is pickled, so a
checkpoint from anywhere can be loaded without running code from it. Writes are atomic (temp
file in the same folder, fsync, rename, fsync of the folder; see :mod:`qdistill.atomic`), so a
kill at any moment leaves either the previous checkpoint or the new one.

JSON has only string keys, but some scheduler states are dicts with int keys (``MultiStepLR``'s
``milestones`` is a ``Counter`` of epochs); such dicts are stored as tagged item lists and
rebuilt with their original keys, otherwise a resumed scheduler would never decay.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from qdistill.atomic import atomic_save_safetensors
from qdistill.errors import FileFormatError, QDistillError

META_KEY = "qdistill_checkpoint"
CHECKPOINT_VERSION = 1
_ITEMS_TAG = "__qdistill_items__"  # marks a dict whose keys are not all strings
_COUNTER_TAG = "__qdistill_counter__"  # the same for a collections.Counter


def _to_json(value: Any, where: str) -> Any:
    """``value`` as plain JSON data; dicts with non-string keys become tagged item lists."""
    if isinstance(value, dict):
        tag = _COUNTER_TAG if isinstance(value, Counter) else _ITEMS_TAG
        if tag == _ITEMS_TAG and all(isinstance(k, str) for k in value):
            return {k: _to_json(v, f"{where}.{k}") for k, v in value.items()}
        return {tag: [[_to_json(k, where), _to_json(v, f"{where}.{k}")] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise QDistillError(
        f"checkpoint cannot store {where} of type {type(value).__name__} (only tensors, numbers, "
        "strings, lists and dicts); use an optimizer/scheduler whose state is plain data"
    )


def _from_json(value: Any) -> Any:
    """Inverse of :func:`_to_json` (lists stay lists: torch accepts them for tuples)."""
    if isinstance(value, dict):
        for tag, kind in ((_ITEMS_TAG, dict), (_COUNTER_TAG, Counter)):
            if set(value) == {tag}:
                return kind({_hashable(_from_json(k)): _from_json(v) for k, v in value[tag]})
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors of ``optimizer.state_dict()`` for the body, the rest for the JSON document."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.state.{idx}.{key}"] = value.detach().contiguous().clone()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> dict[str, Any]:
    """Rebuild an ``optimizer.state_dict()`` from the body tensors and the JSON document."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim.state."):
            idx, name = key[len("optim.state.") :].split(".", 1)
            state.setdefault(int(idx), {})[name] = value
    for idx, scalars in doc["scalars"].items():
        state.setdefault(int(idx), {}).update(scalars)
    return {"state": state, "param_groups": doc["param_groups"]}


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Atomically write model (+ optimizer, scheduler, ``meta``) state to ``path``.

    Tensors are cloned contiguous, so tied weights and views are stored as separate plain
    tensors (safetensors refuses shared storage). ``meta`` must be JSON data.
    """
    tensors = {f"model.{k}": v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    doc: dict[str, Any] = {"version": CHECKPOINT_VERSION, "meta": meta or {}}
    if optimizer is not None:
        opt_tensors, doc["optimizer"] = _split_optimizer(optimizer.state_dict())
        tensors.update(opt_tensors)
    if scheduler is not None:
        doc["scheduler"] = scheduler.state_dict()
    header = json.dumps(_to_json(doc, "checkpoint"))
    return atomic_save_safetensors(tensors, path, metadata={META_KEY: header})


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON document and the tensors of a checkpoint file, or a FileFormatError."""
    if not path.is_file():
        raise FileFormatError(f"checkpoint {path} does not exist; train without --resume first")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = (f.metadata() or {}).get(META_KEY)
            if header is None:
                raise FileFormatError(
                    f"{path} is not a qdistill checkpoint (no {META_KEY!r} header); "
                    "point --resume at a checkpoint folder written by qd.fit"
                )
            doc = _from_json(json.loads(header))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileFormatError:
        raise
    except Exception as exc:
        raise FileFormatError(
            f"{path} is not a readable checkpoint ({exc}); delete it to start over"
        ) from None
    version = doc.get("version") if isinstance(doc, dict) else None
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise FileFormatError(
            f"{path} has checkpoint version {version!r}, this qdistill reads up to "
            f"{CHECKPOINT_VERSION}; upgrade qdistill or delete the checkpoint to start over"
        )
    return doc, tensors


def _check_sections(
    path: Path, doc: dict[str, Any], tensors: dict[str, Any], optimizer: bool, scheduler: bool
) -> None:
    """Every section the caller restores is there and whole: a checkpoint without its optimizer
    state would silently resume with a fresh Adam, one without ``meta`` cannot say where it is."""
    fix = "the checkpoint was edited or damaged; delete it to start over"
    if not isinstance(doc.get("meta"), dict):
        raise FileFormatError(f"{path} has no 'meta' section (training progress); {fix}")
    if optimizer:
        opt = doc.get("optimizer")
        if not isinstance(opt, dict) or not isinstance(opt.get("param_groups"), list):
            raise FileFormatError(f"{path} has no optimizer state to resume from; {fix}")
        scalars = opt.get("scalars")
        if not isinstance(scalars, dict):
            raise FileFormatError(f"{path}: the optimizer state has no 'scalars'; {fix}")
        with_tensors = {k.split(".")[2] for k in tensors if k.startswith("optim.state.")}
        if with_tensors and set(scalars) and with_tensors != set(scalars):
            raise FileFormatError(
                f"{path}: optimizer state tensors exist for parameters {sorted(with_tensors)} "
                f"but scalars for {sorted(scalars)}; {fix}"
            )
        names: dict[str, set[str]] = {}
        for k in tensors:
            if k.startswith("optim.state."):
                idx, name = k[len("optim.state.") :].split(".", 1)
                names.setdefault(idx, set()).add(name)
        if len({frozenset(v) for v in names.values()}) > 1:
            raise FileFormatError(f"{path}: some optimizer state tensors are missing; {fix}")
    if scheduler and not isinstance(doc.get("scheduler"), dict):
        raise FileFormatError(f"{path} has no scheduler state to resume from; {fix}")


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote into ``model`` (and optimizer, scheduler).

    Returns the ``meta`` dict. The model must have the architecture the checkpoint was written
    for; a mismatch is a :class:`FileFormatError` rather than torch's long key listing.
    """
    path = Path(path)
    doc, tensors = _read(path)
    _check_sections(path, doc, tensors, optimizer is not None, scheduler is not None)
    model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(model_state)
        if optimizer is not None:
            optimizer.load_state_dict(_join_optimizer(tensors, doc["optimizer"]))
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileFormatError(
            f"{path} does not fit this model/optimizer ({first}); resume with the same model "
            "and optimizer settings, or delete the checkpoint to start over"
        ) from None
    if scheduler is not None:
        scheduler.load_state_dict(doc["scheduler"])
    return doc["meta"]
