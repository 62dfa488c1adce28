"""qdistill as a transformers quantization method: ``save_pretrained`` / ``from_pretrained``.

transformers (4.4x and 5.x) lets a library add a quantization method through two registries,
``register_quantization_config(name)`` and ``register_quantizer(name)`` (in
``transformers.quantizers.auto``): a ``QuantizationConfigMixin`` subclass that is what
``config.json`` stores under ``quantization_config``, and an ``HfQuantizer`` subclass whose hooks
``from_pretrained`` and ``save_pretrained`` call. qdistill registers ``quant_method="qdistill"``:

* ``save_pretrained`` of a model that ``qd.quantize_`` quantized (fake-quant) or that holds packed
  layers writes what ``qd.save`` writes (packed codes, scales; float tensors for the rest; the
  qdistill header in the safetensors metadata), through ``HfQuantizer.get_state_dict_and_metadata``,
  and ``config.json`` gets ``quantization_config = {"quant_method": "qdistill", "layers": ...}``
  with each packed layer's format and shape: the float master weights are never written;
* ``from_pretrained`` of such a folder (any ``AutoModel...`` class) builds the model on the meta
  device as usual; ``_process_model_before_weight_loading`` swaps each packed layer in, with
  empty (meta) buffers of the shapes the checkpoint holds; transformers' loader then fills them
  from the file like any other tensor. The result is the packed model ``qd.load`` gives.

Registration happens on ``import qdistill`` (at once if transformers is already imported,
otherwise when transformers' quantizer registry is first imported; see :mod:`qdistill.hf`).
Only pre-quantized folders load this way: quantizing a float checkpoint is ``qd.quantize_``'s job.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from qdistill.errors import ConfigError, FileFormatError, QDistillError
from qdistill.models import hf_arch

QUANT_METHOD = "qdistill"


class QDistillConfig(QuantizationConfigMixin):
    """``quantization_config`` of a folder qdistill wrote: per packed layer, the header entry
    ``qd.save`` writes (format, activations, weight shape, layout)."""

    def __init__(
        self,
        format_version: int = 1,
        layers: dict[str, dict[str, Any]] | None = None,
        identity: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        self.format_version = int(format_version)
        self.layers = dict(layers or {})
        self.identity = list(identity or [])

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "layers": json.loads(json.dumps(self.layers)),
            "identity": list(self.identity),
        }


class QDistillHfQuantizer(HfQuantizer):
    """Loads and saves qdistill's packed layers inside transformers' own ``from_pretrained`` /
    ``save_pretrained``."""

    requires_calibration = True  # loads packed folders only; quantizing is qd.quantize_
    quantization_config: QDistillConfig

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        from qdistill.pack.io import FORMAT_VERSION

        if self.quantization_config.format_version > FORMAT_VERSION:
            raise FileFormatError(
                f"the folder uses qdistill file format {self.quantization_config.format_version}, "
                f"newer than this qdistill reads ({FORMAT_VERSION}); upgrade qdistill"
            )

    def update_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        """Packed layers compute in float32 (the C kernels take float32 activations)."""
        if dtype is not None and dtype != torch.float32:
            raise ConfigError(
                f"qdistill packed models run in float32, not {dtype}; load with "
                "dtype=torch.float32 (the packed weights are already low-bit)"
            )
        return torch.float32

    def _process_model_before_weight_loading(
        self, model: nn.Module, checkpoint_files: list[str] | None = None, **kwargs: Any
    ) -> None:
        from qdistill.pack.io import _set_module
        from qdistill.pack.modules import PACKED_TENSORS, packed_from_meta

        specs = _tensor_specs(checkpoint_files or [])
        for name in self.quantization_config.identity:
            _set_module(model, name, nn.Identity())
        for name, meta in self.quantization_config.layers.items():
            try:
                model.get_submodule(name)
            except AttributeError:
                raise FileFormatError(
                    f"quantization_config names layer {name!r}, which {type(model).__name__} "
                    "does not have; the folder's config.json and weights do not match"
                ) from None
            tensors = {
                key: torch.empty(specs[f"{name}.{key}"], device="meta")
                for key in PACKED_TENSORS
                if f"{name}.{key}" in specs
            }
            if "weight_codes" not in tensors or "weight_scale" not in tensors:
                raise FileFormatError(
                    f"the packed weight of {name!r} is missing from the checkpoint; the folder "
                    "is incomplete (write it again with save_pretrained)"
                )
            layer = packed_from_meta(meta, tensors)
            _set_module(model, name, layer)
            if layer.folded_bn:
                _set_module(model, layer.folded_bn, nn.Identity())
            hf_arch.skip_parent_init(model, name)
        hf_arch.untie_packed(model)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        from qdistill.pack.io import _check_packed_sizes, _fuse
        from qdistill.pack.modules import PackedMixin

        for name, module in model.named_modules():
            if isinstance(module, PackedMixin):
                if any(b.is_meta for b in module.buffers()):
                    raise FileFormatError(
                        f"the packed tensors of {name!r} were not loaded; the folder is incomplete"
                    )
                for key in ("weight_scale", "act_scale"):  # scales are float32 in qdistill
                    t = getattr(module, key, None)
                    if t is not None and t.is_floating_point() and t.dtype != torch.float32:
                        setattr(module, key, t.float())
                _check_packed_sizes(Path(model.config.name_or_path or name), name, module)
        # the paths qd.load gives (qdistill.pack.fastops.restore / chain.unfuse_sequentials undo)
        return _fuse(model)

    def get_state_dict_and_metadata(
        self, model: nn.Module
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """What ``save_pretrained`` writes: ``qd.save``'s packed tensors and header."""
        from qdistill.pack.io import META_KEY, packed_state

        if getattr(model, "_qd_pooling", None) == "mean":
            raise QDistillError(
                f"this {type(model).__name__} classifies by mean pooling (HFClassifier "
                "pooling='mean'), which the transformers class cannot express: a folder from "
                "save_pretrained would reload with [CLS] pooling and a random pooler. Save the "
                "HFClassifier with qd.save(model, path) and load it with qd.load(path)"
            )
        tensors, header = packed_state(model)
        # float tensors as the model holds them (not copies), so that transformers sees which
        # ones are tied (lm_head / embeddings) and writes each shared table once
        packed = tuple(name + "." for name in header["layers"])
        state = model.state_dict()
        for key in tensors:
            if key in state and not key.startswith(packed):
                tensors[key] = state[key].detach()
        self.quantization_config.format_version = header["format_version"]
        self.quantization_config.layers = header["layers"]
        self.quantization_config.identity = header["identity"]
        model.config.quantization_config = self.quantization_config
        return tensors, {META_KEY: json.dumps(header, separators=(",", ":"))}

    def is_serializable(self, safe_serialization: bool | None = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # fake-quant layers train (QAT); packed layers run inference

    @property
    def is_qat_trainable(self) -> bool:
        return True


def _tensor_specs(files: list[str]) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in the checkpoint files (headers only, no data)."""
    specs: dict[str, tuple[int, ...]] = {}
    for file in files:
        if not str(file).endswith(".safetensors"):
            raise FileFormatError(
                f"{file}: qdistill folders hold safetensors weights; write it with save_pretrained"
            )
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                specs[key] = tuple(f.get_slice(key).get_shape())
    return specs


def register() -> None:
    """Add ``quant_method="qdistill"`` to transformers' registries (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(QDistillConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(QDistillHfQuantizer)


def attach(model: nn.Module) -> None:
    """Give a transformers model (or the one inside an HFClassifier) qdistill's quantizer, so
    that its ``save_pretrained`` writes packed codes. A model loaded from GGUF holds float
    weights (transformers dequantizes GGUF on load), so its GGUF loader is replaced; a model
    that another method quantized in memory (bitsandbytes, ...) is left alone."""
    hf, _ = hf_arch._hf_model(model)
    if hf is None:
        return
    register()
    current = getattr(hf, "hf_quantizer", None)
    method = getattr(getattr(current, "quantization_config", None), "quant_method", None)
    if current is None or str(getattr(method, "value", method)) == "gguf":
        hf.hf_quantizer = QDistillHfQuantizer(QDistillConfig(), pre_quantized=True)
        hf.config.quantization_config = hf.hf_quantizer.quantization_config
        hf.quantization_method = QUANT_METHOD
