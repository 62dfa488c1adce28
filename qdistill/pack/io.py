"""``save`` / ``load``: models with truly packed low-bit weights in one safetensors file.

File layout (format version 1):

* tensors: for each quantized layer ``L``: ``L.weight_codes`` (packed ``uint8``, see
  :mod:`qdistill.pack.bits`), ``L.weight_scale`` (float32, one per block) and, for asymmetric
  formats, ``L.weight_zero_point`` (uint8); every other entry of the state dict (biases,
  BatchNorm statistics, layers kept in full precision) under its own name, as float;
* metadata key ``"qdistill"``: one JSON document with the format version, the architecture
  (``{"name", "kwargs"}`` for models from :mod:`qdistill.models`, ``{"transformers": {"class",
  "config", "wrapper"}}`` for transformers models, see :mod:`qdistill.models.hf_arch`), per
  quantized layer its format, weight shape and conv geometry, ``checksums`` (the CRC-32 of
  every tensor's bytes) and ``header_crc32`` (the CRC-32 of the rest of the header).

Loading reads only safetensors and JSON: nothing in a file is ever executed (no pickle). The
whole header and every tensor are checked against each other (:mod:`qdistill.pack.validate`)
before the model is touched, so a bad file raises one FileFormatError and changes nothing.
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
from qdistill.errors import FileFormatError, QDistillError
from qdistill.formats import format_from_dict
from qdistill.formats.storage import storage_of
from qdistill.models import hf_arch
from qdistill.pack import chain, fastops, huffman, validate
from qdistill.pack.bits import pack_for, unpack_for
from qdistill.pack.modules import (
    PACKED_TENSORS,
    PackedMixin,
    pack_layer,
    packed_from_meta,
)
from qdistill.quant.modules import is_quantized

FORMAT_VERSION = 1
META_KEY = "qdistill"


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def freeze(model: nn.Module, fuse: bool = True) -> nn.Module:
    """Replace every fake-quant layer by its packed inference twin, in place.

    After this the model holds codes, not float weights: it is what :func:`load` returns
    (``fuse`` as there).
    """
    for name, module in list(model.named_modules()):
        if is_quantized(module):
            _set_module(model, name, pack_layer(module))
    return _fuse(model) if fuse else model


def _fuse(model: nn.Module) -> nn.Module:
    """qdistill's faster paths for what torch and transformers would run op by op: runs of
    packed Linears (:mod:`qdistill.pack.chain`); GELU, attention and BERT layers
    (:func:`qdistill.pack.fastops.accelerate`, for float models too)."""
    fastops.accelerate(model)
    return chain.fuse_sequentials(model)


def _packed_tensors(name: str, layer: PackedMixin) -> dict[str, torch.Tensor]:
    out = {
        f"{name}.{key}": getattr(layer, key)
        for key in PACKED_TENSORS
        if getattr(layer, key, None) is not None
    }
    out[f"{name}.weight_codes"] = layer.packed_codes()
    return out


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    entropy_coding: str | None = None,
    checksum: bool = True,
) -> Path:
    """Write ``model`` with its quantized layers truly packed; returns the path.

    The model itself is not changed. Fake-quant layers are packed with deterministic rounding,
    so the stored weights are exactly what the model computes with in eval mode. With
    ``entropy_coding="huffman"`` each layer's codes are Huffman-coded where that is smaller
    (Polino et al. 2018 report sizes this way); loading decodes them exactly. The file is
    written atomically: a crash leaves either the old file or the new one, never a torn one.
    With ``checksum`` (the default) the header records the CRC-32 of every tensor, which
    :func:`load` verifies, so flipped bits are an error rather than a silently wrong model.
    """
    tensors, header = packed_state(model, entropy_coding)
    if checksum:
        header["checksums"] = {k: validate.tensor_checksum(t) for k, t in tensors.items()}
    return atomic_save_safetensors(
        tensors,
        Path(path),
        metadata={META_KEY: json.dumps(validate.seal(header), separators=(",", ":"))},
    )


def packed_state(
    model: nn.Module, entropy_coding: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the (unsealed, checksum-free) header that :func:`save` writes; also what
    ``save_pretrained`` writes through :mod:`qdistill.models.hf_quantizer`."""
    if entropy_coding not in (None, "huffman"):
        raise FileFormatError(f"entropy_coding={entropy_coding!r}; use None or 'huffman'")
    layers: dict[str, dict[str, Any]] = {}
    tensors: dict[str, torch.Tensor] = {}
    packed_prefixes: list[str] = []
    for name, module in model.named_modules():
        if is_quantized(module):
            layer = pack_layer(module)  # type: ignore[arg-type]
        elif isinstance(module, PackedMixin):
            layer = module
        else:
            continue
        layers[name] = layer.layer_meta()
        tensors.update(_packed_tensors(name, layer))
        if entropy_coding == "huffman":
            _huffman_encode(name, layer, layers[name], tensors)
        packed_prefixes.append(name + ".")
    tied = hf_arch.tied_targets(model)  # e.g. lm_head.weight, the same table as the embedding
    written: dict[int, str] = {}
    for key, value in model.state_dict().items():
        if any(key.startswith(p) for p in packed_prefixes):
            continue
        if key in tied and value.numel() and value.data_ptr() in written:  # one table, two names:
            continue  # written once, as save_pretrained does; load ties it again
        written.setdefault(value.data_ptr(), key)
        tensors[key] = value.detach().contiguous().clone()
    header = {
        "format_version": FORMAT_VERSION,
        "architecture": getattr(model, "qd_arch", None) or hf_arch.architecture_of(model),
        "layers": layers,
        # modules replaced by Identity (e.g. BatchNorm folded into its conv before quantizing),
        # so that a model rebuilt from the architecture can be given the same shape
        "identity": [n for n, m in model.named_modules() if n and isinstance(m, nn.Identity)],
    }
    return tensors, header


def _huffman_encode(
    name: str, layer: PackedMixin, meta: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> None:
    """Swap the layer's packed codes for their Huffman code when that is smaller."""
    fmt = layer.weight_format
    numel = int(torch.Size(layer.weight_shape).numel())
    codes = unpack_for(layer.packed_codes(), fmt, numel)
    try:
        stream, lengths = huffman.encode(codes, 2**fmt.bits)
    except ValueError:  # a code longer than the decoder's table: keep fixed length
        return
    entropy = {"kind": "huffman", "lengths": lengths}
    header_cost = len(json.dumps({"entropy": entropy}, separators=(",", ":")))
    if stream.numel() + header_cost < tensors[f"{name}.weight_codes"].numel():  # file shrinks
        tensors[f"{name}.weight_codes"] = stream
        meta["entropy"] = entropy


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The qdistill header of a packed file, validated (no tensors are read)."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: no such file; give the path of a file written by qd.save")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises several types for foreign or torn files
        raise FileFormatError(
            f"{path} is not a safetensors file or is corrupt ({exc}); "
            "qd.load reads files written by qd.save"
        ) from None
    if META_KEY not in meta:
        raise FileFormatError(
            f"{path} is a safetensors file but not a qdistill file (no {META_KEY!r} header); "
            "write it with qd.save, or load plain weights with safetensors"
        )
    try:
        header = json.loads(meta[META_KEY])
    except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
        raise FileFormatError(f"{path}: the qdistill header is corrupt (not JSON)") from None
    validate.check_header(header, path, FORMAT_VERSION)
    return header


def _build_architecture(header: dict[str, Any], path: Path) -> nn.Module:
    arch = header.get("architecture")
    if not arch:
        raise FileFormatError(
            f"{path} does not record its architecture (the model was not built by "
            "qdistill.models); pass the model: qd.load(path, model=MyModel())"
        )
    if "transformers" in arch:  # a transformers model: its class and config (hf_arch)
        return hf_arch.build(arch["transformers"], path)
    from qdistill.models import build_model

    name, kwargs = arch.get("name"), arch.get("kwargs", {})
    if not isinstance(name, str) or not isinstance(kwargs, dict):
        raise FileFormatError(f"{path}: header key 'architecture' is {arch!r}; corrupt")
    validate.check_architecture_size(name, kwargs, path, build_model)
    try:
        return build_model(name, **kwargs)
    except (TypeError, ValueError, OverflowError, RuntimeError) as exc:  # ConfigError: ValueError
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FileFormatError(f"{path}: cannot build architecture {name!r} ({first})") from None


def load(
    path: str | os.PathLike[str], model: nn.Module | None = None, fuse: bool = True
) -> nn.Module:
    """Load a packed model; quantized layers become packed layers that compute from codes.

    With ``model`` given (a float or fake-quant model of the same architecture), its layers are
    replaced in place; otherwise the architecture recorded in the file is built (a transformers
    model too, see :mod:`qdistill.models.hf_arch`; ``path`` may then be the folder
    ``save_pretrained`` wrote). Any mismatch
    between the file and the model names the tensor; the model is changed only once the whole
    file has been checked (:mod:`qdistill.pack.validate`), so a bad file leaves it as it was.
    With ``fuse`` (the default) every plain ``nn.Sequential`` holding two or more packed
    Linears in a row becomes a :class:`~qdistill.pack.chain.PackedSequential`, which runs them
    (and the ReLUs between) in one C call with bit-identical outputs, and a transformer's exact
    GELUs, attention and BERT layers take qdistill's paths
    (:func:`qdistill.pack.fastops.accelerate`: C GELU and attention, equal to torch's within
    float rounding; the BERT layer bit-identical); ``fuse=False`` keeps torch's and
    transformers' own modules.
    """
    path = hf_arch.weights_file(Path(path))  # a save_pretrained folder: its safetensors file
    header = read_header(path)
    if model is None:
        model = _build_architecture(header, path)
    validate.check_targets(model, header, path)
    layers_meta: dict[str, dict[str, Any]] = header.get("layers", {})
    with safe_open(str(path), framework="pt") as f:
        index = validate.tensor_index(f, path)

        def get(key: str) -> torch.Tensor:
            try:
                t = f.get_tensor(key).clone()  # own memory: the file mapping can close
            except Exception as exc:
                raise FileFormatError(f"{path}: cannot read tensor {key!r} ({exc})") from None
            validate.check_checksum(key, t, header, path)
            return t

        for name, meta in layers_meta.items():
            validate.check_layer_tensors(name, meta, index, model.get_submodule(name), path)
        state, expected_keys = _expected_state(model, header)
        keys = set(index)
        used = {n + "." + k for n in layers_meta for k in PACKED_TENSORS if n + "." + k in keys}
        expected_keys -= hf_arch.tied_targets(model) - keys  # tied tables written once
        missing = sorted(expected_keys - keys)
        unexpected = sorted(keys - used - expected_keys)
        if missing or unexpected:
            raise FileFormatError(
                f"{path} does not match {type(model).__name__}: missing tensors {missing[:5]}, "
                f"unexpected tensors {unexpected[:5]}; pass the model the file was saved from"
            )
        for k in sorted(expected_keys):
            dtype, shape = index[k]
            if shape != tuple(state[k].shape) or (
                dtype.is_floating_point != state[k].dtype.is_floating_point
            ):
                raise FileFormatError(
                    f"{path}: tensor {k!r} is {dtype} {shape} in the file but "
                    f"{state[k].dtype} {tuple(state[k].shape)} in the model"
                )

        packed: dict[str, PackedMixin] = {}
        for name, meta in layers_meta.items():
            prefix = name + "."
            tensors = {k: get(prefix + k) if prefix + k in keys else None for k in PACKED_TENSORS}
            for k in ("weight_scale", "bias", "act_scale"):  # the packed layers compute in fp32
                if tensors[k] is not None:
                    tensors[k] = tensors[k].float()
            if meta.get("entropy"):
                tensors["weight_codes"] = _huffman_decode(path, name, meta, tensors["weight_codes"])
            validate.check_layer_values(name, meta, tensors, path)
            layer = packed_from_meta(meta, tensors)
            _check_packed_sizes(path, name, layer)
            packed[name] = layer
        rest = {k: get(k) for k in expected_keys}

    for name in header.get("identity", []):
        if not isinstance(model.get_submodule(name), nn.Identity):
            _set_module(model, name, nn.Identity())
    for name, layer in packed.items():
        _set_module(model, name, layer)
        if layer.folded_bn:
            _set_module(model, layer.folded_bn, nn.Identity())
    built_on_meta = any(t.is_meta for t in model.state_dict().values())
    model.load_state_dict(rest, strict=False, assign=built_on_meta)
    hf_arch.finish(model, path)
    model.eval()
    return _fuse(model) if fuse else model


def _expected_state(
    model: nn.Module, header: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The model's state dict and the keys the file must hold besides the packed layers'
    (entries of packed layers and of modules the header turns into Identity excluded)."""
    state = model.state_dict()
    gone = [n + "." for n in header.get("layers", {})]
    gone += [n + "." for n in header.get("identity", [])]
    gone += [m["folded_bn"] + "." for m in header.get("layers", {}).values() if m.get("folded_bn")]
    gone += [n + "." for n, m in model.named_modules() if isinstance(m, PackedMixin)]
    return state, {k for k in state if not any(k.startswith(p) for p in gone)}


def _huffman_decode(
    path: Path, name: str, meta: dict[str, Any], stream: torch.Tensor
) -> torch.Tensor:
    """Decode a Huffman-coded layer back to the standard packed layout."""
    if meta["entropy"].get("kind") != "huffman":
        raise FileFormatError(f"{path}: layer {name!r} uses unknown entropy coding; upgrade")
    fmt = format_from_dict(meta["format"])
    numel = int(torch.Size([int(s) for s in meta["shape"]]).numel())
    codes = huffman.decode(stream, meta["entropy"]["lengths"], numel)
    try:
        return pack_for(codes, fmt)
    except QDistillError as exc:  # a symbol the format has no code for (ternary 3)
        raise FileFormatError(f"{path}: layer {name!r}: {exc}; the file is corrupt") from None


def _check_packed_sizes(path: Path, name: str, layer: PackedMixin) -> None:
    """Catch a truncated or tampered codes/scale tensor at load time, naming it."""
    st = storage_of(layer.weight_format)
    numel = int(torch.Size(layer.weight_shape).numel())
    need = st.nbytes(numel)
    if layer.weight_codes.numel() != need:
        raise FileFormatError(
            f"{path}: tensor '{name}.weight_codes' holds {layer.weight_codes.numel()} bytes, "
            f"expected {need}; the file is truncated or corrupt"
        )
    # from the shape alone (to_blocks on a meta tensor pulled in torch._dynamo: +70 MB RSS)
    blocks = st.n_scales(layer.weight_shape)
    if layer.weight_scale.numel() != blocks:
        raise FileFormatError(
            f"{path}: tensor '{name}.weight_scale' holds {layer.weight_scale.numel()} scales, "
            f"expected {blocks}; the file is corrupt"
        )
