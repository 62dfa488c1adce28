"""The architecture of a Hugging Face transformers model, as a packed file records it.

``qd.save`` writes ``{"transformers": {"class", "config", "wrapper"}}`` into the header: the
model class *name*, its ``config.to_dict()`` and, for a :class:`~qdistill.models.hf.HFClassifier`,
the wrapper. ``qd.load(path)`` then rebuilds the model offline without a skeleton:

* the class is looked up by name in transformers' own namespace and must be a
  ``PreTrainedModel`` that transformers itself defines; anything else is refused (no import of a
  module named by the file, no ``trust_remote_code``: loading never executes code from a file);
* the model is built on the meta device (parameters are never allocated nor randomly
  initialised: the file's tensors are assigned in their place); non-persistent buffers (rotary
  frequencies, position ids) are then computed by the model's own initialisation, as
  ``from_pretrained`` does;
* tied weights (``lm_head`` and the input embeddings) are tied again after loading.

Nothing here imports transformers unless a model or a file needs it.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdistill.errors import FileFormatError

# modules a model rebuilt from its config (plus the file's packed layers) can hold
_REBUILDABLE = ("torch.", "transformers.", "qdistill.quant.", "qdistill.pack.")


def _hf_model(model: nn.Module) -> tuple[nn.Module | None, str | None]:
    """The transformers model inside ``model`` and the qdistill wrapper around it, if any."""
    tf = sys.modules.get("transformers")
    if tf is None:  # no transformers model can exist before transformers is imported
        return None, None
    if isinstance(model, tf.PreTrainedModel):
        return model, None
    inner = getattr(model, "hf", None)
    if type(model).__name__ == "HFClassifier" and isinstance(inner, tf.PreTrainedModel):
        return inner, "HFClassifier"
    return None, None


def config_dict(hf: nn.Module) -> dict[str, Any]:
    """The model's config as JSON values, without the quantization entry (the layers of a
    packed file describe the quantization themselves)."""
    config = hf.config.to_dict()
    config.pop("quantization_config", None)
    return config


def architecture_of(model: nn.Module) -> dict[str, Any] | None:
    """The header record of a transformers model (``None`` for any other model).

    Only classes that transformers itself defines are recorded: a subclass from user code
    could not be rebuilt without running that code, so such a file needs ``model=`` to load.
    """
    hf, wrapper = _hf_model(model)
    if hf is None or not type(hf).__module__.startswith("transformers."):
        return None
    if any(not type(m).__module__.startswith(_REBUILDABLE) for m in hf.modules()):
        return None  # e.g. SubLN inserted by BitDistill: the config alone does not rebuild it
    record = {"class": type(hf).__name__, "config": config_dict(hf), "wrapper": wrapper}
    if wrapper == "HFClassifier":  # mean pooling is the wrapper's, not the config's
        record["pooling"] = getattr(model, "pooling", "model")
    return {"transformers": record}


def model_class(name: Any, path: Path | str) -> type:
    """The transformers class called ``name``, or a FileFormatError that names it and the fix."""
    try:
        tf = importlib.import_module("transformers")
    except ImportError:
        raise FileFormatError(
            f"{path} holds a transformers model ({name}); install transformers to load it: "
            "pip install 'qdistill[transformers]'"
        ) from None
    cls = getattr(tf, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (
        isinstance(cls, type)
        and issubclass(cls, tf.PreTrainedModel)
        and cls.__module__.startswith("transformers.")
    ):
        raise FileFormatError(
            f"{path}: the header names model class {name!r}, which transformers "
            f"{tf.__version__} cannot build (it builds only its own PreTrainedModel classes); "
            "upgrade transformers if the class is newer, or pass the model: "
            "qd.load(path, model=<the model the file was saved from>)"
        )
    return cls


def build(spec: dict[str, Any], path: Path | str) -> nn.Module:
    """An empty (meta-device) model of the class and config a header records."""
    if not isinstance(spec, dict) or not isinstance(spec.get("config"), dict):
        raise FileFormatError(f"{path}: the transformers architecture in the header is corrupt")
    cls = model_class(spec.get("class"), path)
    config_values = dict(spec["config"])
    config_values.pop("quantization_config", None)
    try:
        config = cls.config_class.from_dict(config_values)
    except Exception as exc:  # transformers raises several types for a config it cannot read
        raise FileFormatError(
            f"{path}: transformers cannot read the {cls.__name__} config in the header ({exc}); "
            "upgrade transformers, or pass the model: qd.load(path, model=...)"
        ) from None
    from transformers import initialization

    with torch.device("meta"), initialization.no_init_weights():
        hf = cls(config)
    wrapper = spec.get("wrapper")
    if wrapper is None:
        return hf
    if wrapper != "HFClassifier":
        raise FileFormatError(
            f"{path}: unknown model wrapper {wrapper!r} in the header; upgrade qdistill"
        )
    from qdistill.models.hf import POOLINGS, HFClassifier

    pooling = spec.get("pooling", "model")
    if pooling not in POOLINGS:
        raise FileFormatError(f"{path}: unknown pooling {pooling!r} in the header; upgrade")
    return HFClassifier(hf, pooling)


def finish(model: nn.Module, path: Path | str) -> None:
    """After the file's tensors are in: tie the tied weights again, compute the non-persistent
    buffers a meta-device build left empty (by the model's own initialisation, which skips
    every loaded tensor), and give the model qdistill's HfQuantizer (``save_pretrained``)."""
    hf, _ = _hf_model(model)
    if hf is None:
        return
    if any(t.is_meta for t in hf.state_dict().values()) or any(b.is_meta for b in hf.buffers()):
        _materialize(hf)
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise FileFormatError(
            f"{path}: tensors {meta[:5]} of {type(hf).__name__} are neither in the file nor "
            "computed by the model; the file is incomplete"
        )
    from qdistill.models.hf_quantizer import attach

    attach(hf)


def _materialize(hf: nn.Module) -> None:
    """What ``from_pretrained`` does after loading, with public transformers calls."""
    untie_packed(hf)
    hf.tie_weights(recompute_mapping=False)
    loaded = [t for t in [*hf.parameters(), *hf.buffers()] if not t.is_meta]
    for t in loaded:
        t._is_hf_initialized = True  # the initialisation below must leave these alone
    for module in hf.modules():  # only a module that owns an empty tensor needs initialising
        own = [*module._parameters.values(), *module._buffers.values()]
        module._is_hf_initialized = not any(t is not None and t.is_meta for t in own)
    for name, buf in list(hf.named_buffers()):
        if buf.is_meta:
            owner, _, leaf = name.rpartition(".")
            module = hf.get_submodule(owner) if owner else hf
            module._buffers[leaf] = torch.empty_like(buf, device="cpu")
    hf.initialize_weights()
    for t in loaded:
        del t._is_hf_initialized


def skip_parent_init(model: nn.Module, name: str) -> None:
    """Keep transformers' weight initialisation away from the parent of packed layer ``name``
    when the parent owns no tensor itself: a parent's ``_init_weights`` may reach for its
    children's ``.weight`` (GPT-2 rescales ``c_proj.weight``), which a packed layer does not
    have, and there is nothing of the parent's own to initialise."""
    owner = name.rpartition(".")[0]
    parent = model.get_submodule(owner) if owner else model
    if not parent._parameters and not parent._buffers:
        parent._is_hf_initialized = True


def untie_packed(hf: nn.Module) -> None:
    """Drop the ties whose target is a packed layer (a 4-bit ``lm_head`` cannot share the float
    embedding table it was tied to; each keeps its own storage)."""
    from qdistill.pack.modules import PackedMixin

    tied = getattr(hf, "all_tied_weights_keys", None)
    if not isinstance(tied, dict):
        return
    packed = tuple(n + "." for n, m in hf.named_modules() if isinstance(m, PackedMixin))
    for target in [t for t in tied if t.startswith(packed) or tied[t].startswith(packed)]:
        tied.pop(target)


def weights_file(path: Path) -> Path:
    """``path`` itself, or the one safetensors file of a folder ``save_pretrained`` wrote."""
    if not path.is_dir():
        return path
    single = path / "model.safetensors"
    if single.is_file():
        return single
    shards = sorted(path.glob("*.safetensors"))
    raise FileFormatError(
        f"{path} is a folder without a model.safetensors"
        + (f" (it holds {len(shards)} shards)" if shards else "")
        + "; load it with AutoModel...from_pretrained, or save it unsharded "
        "(save_pretrained(..., max_shard_size='100GB')) for qd.load"
    )


def tied_targets(model: nn.Module) -> set[str]:
    """State-dict keys a file may leave out because they are tied to another tensor
    (``save_pretrained`` writes a tied table once; ``tie_weights`` restores the other name)."""
    hf, wrapper = _hf_model(model)
    tied = getattr(hf, "all_tied_weights_keys", None) if hf is not None else None
    if not isinstance(tied, dict):
        return set()
    prefix = "hf." if wrapper else ""
    return {prefix + k for k in tied}
