"""Validation of a packed file before :func:`qdistill.pack.io.load` builds anything from it.

A packed file is untrusted input: its JSON header decides which modules are replaced, how many
codes are decoded and how large a model is built. Every check here runs before the value it
checks is used to size an allocation or to change the model, and every failure is one
:class:`~qdistill.errors.FileFormatError` naming the key or tensor. The checks, in order:

1. :func:`check_header` -- the header's own structure: ``format_version`` (an integer this
   qdistill reads, no coercion: ``"1"`` or ``1.9`` are refused), every layer entry (known keys,
   a parseable weight format of 1..8 bits, a positive integer shape of 2 or 4 dimensions,
   layout ``"lsb"``, conv geometry with ``groups`` dividing the channels, Huffman tables of
   ``2**bits`` lengths of at most :data:`~qdistill.pack.huffman.MAX_CODE_LENGTH` bits with a
   Kraft sum of at most 1), the ``identity`` list and the optional ``checksums``.
2. :func:`check_architecture_size` -- a model rebuilt from the header's architecture is first
   built on the meta device (no memory) and refused when it holds more weights than the file
   could possibly store (every weight takes at least one bit in the file).
3. :func:`check_targets` -- which modules the header may replace: a packed layer only a module
   of its own kind (Linear / Conv2d / Embedding, table :data:`LAYER_TARGETS`), ``identity`` and
   ``folded_bn`` only a BatchNorm (or a module that is already an Identity).
4. :func:`check_layer_tensors` -- each packed layer's tensors against its header entry from
   safetensors' own index (dtype and shape, no data read): presence (a bias when the model's
   layer has one, a zero point exactly when the format is asymmetric), sizes, dtypes.
5. :func:`check_layer_values` -- after reading: scales finite and positive, zero points in the
   format's range, every code a valid code of the format (ternary 3, codebook indices past the
   last point...), and the CRC-32 of each tensor's bytes when the header records one.

Saving records ``checksums`` (:func:`tensor_checksum`, zlib's CRC-32 over the raw bytes of each
tensor: about 1 GB/s, so free next to the write) and ``header_crc32`` (:func:`seal`: the CRC-32
of the rest of the header), so a bit flipped in tensor data, or in a header value that would
still parse (a codebook point, an activation format), is caught on load. A file without them
(written before they existed) loads unverified. They detect damage, not forgery: whoever edits
a file can recompute them, and then the checks above are what stands.
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qdistill.errors import FileFormatError, QDistillError
from qdistill.formats import (
    Format,
    format_from_dict,
)
from qdistill.formats.storage import storage_of
from qdistill.pack.bits import unpack_for
from qdistill.pack.huffman import MAX_CODE_LENGTH
from qdistill.quant.modules import is_hf_conv1d, linear_weight_shape

log = logging.getLogger(__name__)

SUPPORTED_VERSIONS = (1,)
# largest bucket allowed beyond a layer's own size (a bucket is zero-padded to group_size:
# 256 on a 24-weight layer is normal, 10**12 is a 4 TB allocation)
MAX_PAD_GROUP = 1 << 16
LAYOUTS = ("lsb",)
# keys a layer entry may have (what PackedMixin.layer_meta and its subclasses write)
LAYER_KEYS = {
    "format", "activations", "shape", "layout", "folded_bn", "entropy", "conv", "embedding"
}  # fmt: skip
# header kind -> module types a packed layer of that kind may replace (float, fake-quant, packed)
LAYER_TARGETS: dict[str, tuple[type, ...]] = {}
# modules a header may turn into nn.Identity ("identity" list, "folded_bn")
REPLACEABLE_BY_IDENTITY: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm, nn.Identity)


def _targets() -> dict[str, tuple[type, ...]]:
    if not LAYER_TARGETS:  # filled lazily: qdistill.pack.modules imports the kernels
        from qdistill.pack.modules import PackedConv2d, PackedEmbedding, PackedLinear

        LAYER_TARGETS.update(
            linear=(nn.Linear, PackedLinear),
            conv=(nn.Conv2d, PackedConv2d),
            embedding=(nn.Embedding, PackedEmbedding),
        )
    return LAYER_TARGETS


def layer_kind(meta: Mapping[str, Any]) -> str:
    """``"conv"``, ``"embedding"`` or ``"linear"``: the packed layer class an entry builds."""
    if "embedding" in meta:
        return "embedding"
    return "conv" if "conv" in meta else "linear"


def _fail(path: Path, what: str, problem: str) -> FileFormatError:
    return FileFormatError(f"{path}: {what} {problem}; the file is corrupt or was edited")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# --------------------------------------------------------------------------------------------
# 1. the header on its own
# --------------------------------------------------------------------------------------------


def check_version(header: Any, path: Path, current: int) -> int:
    """``format_version`` as an int this qdistill reads (a newer one asks for an upgrade)."""
    if not isinstance(header, dict):
        raise FileFormatError(f"{path}: the qdistill header is not a JSON object; corrupt")
    version = header.get("format_version")
    if not _is_int(version):
        raise _fail(path, "header key 'format_version'", f"is {version!r}, not an integer")
    if version > current:
        raise FileFormatError(
            f"{path} uses qdistill file format {version}, newer than this qdistill reads "
            f"({current}); upgrade qdistill"
        )
    if version not in SUPPORTED_VERSIONS:
        raise _fail(
            path, "header key 'format_version'", f"is {version}; supported: {SUPPORTED_VERSIONS}"
        )
    return version


def parse_format(spec: Any, path: Path, what: str) -> Format:
    """A format from a header entry; any problem is a FileFormatError naming ``what``."""
    if not isinstance(spec, dict):
        raise _fail(path, what, f"is {spec!r}, not a format description")
    for key, kind in (("symmetric", bool), ("stochastic", bool)):
        if key in spec and not isinstance(spec[key], kind):
            raise _fail(path, f"{what}.{key}", f"is {spec[key]!r}, not true/false")
    if "axis" in spec and not (spec["axis"] in (None, "row") or _is_int(spec["axis"])):
        raise _fail(path, f"{what}.axis", f"is {spec['axis']!r}")
    if spec.get("group_size") is not None and not _is_int(spec["group_size"]):
        raise _fail(path, f"{what}.group_size", f"is {spec['group_size']!r}")
    try:
        fmt = format_from_dict(spec)
        bits = fmt.bits
    except (QDistillError, TypeError, ValueError, OverflowError, KeyError) as exc:
        raise _fail(path, what, f"cannot be read ({exc})") from None
    if not _is_int(bits) or not 1 <= bits <= 8:
        raise _fail(path, what, f"has {bits!r}-bit codes; packed codes take 1..8 bits")
    try:
        storage_of(fmt)  # what every later check reads
    except (QDistillError, TypeError, ValueError) as exc:
        raise _fail(path, what, f"has no valid storage ({exc})") from None
    if what.endswith(" format") and spec.get("stochastic"):
        raise _fail(path, f"{what}.stochastic", "is true; packed weights are rounded to nearest")
    return fmt


def _check_shape(shape: Any, path: Path, name: str, kind: str) -> tuple[int, ...]:
    ndim = 4 if kind == "conv" else 2
    if (
        not isinstance(shape, list)
        or len(shape) != ndim
        or not all(_is_int(s) and s >= 1 for s in shape)
    ):
        raise _fail(
            path, f"layer {name!r} shape", f"is {shape!r}; a {kind} weight has {ndim} sizes >= 1"
        )
    return tuple(shape)


def _check_pair(value: Any, minimum: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(_is_int(v) and v >= minimum for v in value)
    )


def _check_conv(conv: Any, shape: tuple[int, ...], path: Path, name: str) -> None:
    what = f"layer {name!r} conv"
    if not isinstance(conv, dict) or set(conv) != {"stride", "padding", "dilation", "groups"}:
        raise _fail(path, what, f"is {conv!r}; it needs stride, padding, dilation and groups")
    if not _check_pair(conv["stride"], 1) or not _check_pair(conv["dilation"], 1):
        raise _fail(path, what, "has a stride or dilation that is not two integers >= 1")
    pad = conv["padding"]
    if not (pad in ("same", "valid") or _check_pair(pad, 0)):
        raise _fail(path, f"{what}.padding", f"is {pad!r}")
    groups = conv["groups"]
    if not _is_int(groups) or groups < 1 or shape[0] % groups:
        raise _fail(path, f"{what}.groups", f"is {groups!r}; it must divide {shape[0]} channels")


def kraft_ok(lengths: list[int]) -> bool:
    """Kraft inequality, exactly in integers: ``sum 2**-l <= 1`` over the used symbols."""
    return sum(1 << (MAX_CODE_LENGTH - n) for n in lengths if n > 0) <= 1 << MAX_CODE_LENGTH


def _check_entropy(entropy: Any, fmt: Format, path: Path, name: str) -> None:
    what = f"layer {name!r} entropy"
    if not isinstance(entropy, dict) or entropy.get("kind") != "huffman":
        raise _fail(path, what, f"is {entropy!r}; the only entropy coding is 'huffman'")
    if set(entropy) != {"kind", "lengths"}:
        raise _fail(path, what, f"has keys {sorted(entropy)}; expected kind and lengths")
    lengths = entropy["lengths"]
    if not isinstance(lengths, list) or len(lengths) != 2**fmt.bits:
        raise _fail(path, f"{what}.lengths", f"must list {2**fmt.bits} code lengths")
    if not all(_is_int(n) and 0 <= n <= MAX_CODE_LENGTH for n in lengths):
        raise _fail(path, f"{what}.lengths", f"must be integers 0..{MAX_CODE_LENGTH}")
    if not any(lengths):
        raise _fail(path, f"{what}.lengths", "code no symbol")
    if not kraft_ok(lengths):
        raise _fail(path, f"{what}.lengths", "break the Kraft inequality (sum of 2**-l > 1)")


def check_layer_entry(name: Any, meta: Any, path: Path) -> tuple[Format, Format | None]:
    """One ``layers`` entry on its own; returns its weight and activation formats."""
    if not isinstance(name, str) or not name:
        raise _fail(path, "a layer name", f"is {name!r}")
    if not isinstance(meta, dict):
        raise _fail(path, f"layer {name!r}", "is not a JSON object")
    unknown = sorted(set(meta) - LAYER_KEYS)
    if unknown:
        raise _fail(path, f"layer {name!r}", f"has unknown keys {unknown}")
    if "embedding" in meta and "conv" in meta:
        raise _fail(path, f"layer {name!r}", "is both a conv and an embedding")
    kind = layer_kind(meta)
    fmt = parse_format(meta.get("format"), path, f"layer {name!r} format")
    act = meta.get("activations")
    act_fmt = None if act is None else parse_format(act, path, f"layer {name!r} activations")
    if kind == "embedding" and act_fmt is not None:
        raise _fail(path, f"layer {name!r}", "is an embedding with an activation format")
    shape = _check_shape(meta.get("shape"), path, name, kind)
    act_axis = getattr(act_fmt, "axis", None)
    rank = 4 if kind == "conv" else 2  # the smallest input the layer takes: [N, C, H, W], [N, F]
    if isinstance(act_axis, int) and not -rank <= act_axis < rank:
        raise _fail(path, f"layer {name!r} activations.axis", f"{act_axis} is not an input axis")
    if meta.get("layout", "lsb") not in LAYOUTS:
        raise _fail(path, f"layer {name!r} layout", f"{meta['layout']!r} is unknown")
    try:
        storage_of(fmt).n_scales(shape)
    except QDistillError as exc:
        raise _fail(path, f"layer {name!r} format", f"does not fit its shape ({exc})") from None
    numel = math.prod(shape)
    for what, f in (("format", fmt), ("activations", act_fmt)):
        group = getattr(f, "group_size", None)
        if group is not None and group > max(numel, MAX_PAD_GROUP):  # pads a bucket to group
            raise _fail(path, f"layer {name!r} {what}.group_size", f"{group} exceeds the layer")
    if kind == "conv":
        _check_conv(meta["conv"], shape, path, name)
    if kind == "embedding":
        emb = meta["embedding"]
        pad = emb.get("padding_idx") if isinstance(emb, dict) else 0
        if (
            not isinstance(emb, dict)
            or set(emb) - {"padding_idx"}
            or not (pad is None or (_is_int(pad) and -shape[0] <= pad < shape[0]))
        ):
            raise _fail(path, f"layer {name!r} embedding", f"is {emb!r}")
    if meta.get("folded_bn") is not None and not isinstance(meta["folded_bn"], str):
        raise _fail(path, f"layer {name!r} folded_bn", f"is {meta['folded_bn']!r}")
    if meta.get("entropy") is not None:
        _check_entropy(meta["entropy"], fmt, path, name)
    return fmt, act_fmt


HEADER_CRC_KEY = "header_crc32"


def _header_crc(header: dict[str, Any]) -> int:
    body = {k: v for k, v in header.items() if k != HEADER_CRC_KEY}
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def seal(header: dict[str, Any]) -> dict[str, Any]:
    """The header with its own CRC-32 added (call last, after every key is set)."""
    return {**header, HEADER_CRC_KEY: _header_crc(header)}


def check_header(header: Any, path: Path, current: int) -> None:
    """Everything in the header that does not need the model or the tensors."""
    check_version(header, path, current)
    if HEADER_CRC_KEY in header and header[HEADER_CRC_KEY] != _header_crc(header):
        raise _fail(path, f"header key {HEADER_CRC_KEY!r}", "does not match the header")
    layers = header.get("layers", {})
    if not isinstance(layers, dict):
        raise _fail(path, "header key 'layers'", "is not a JSON object")
    for name, meta in layers.items():
        check_layer_entry(name, meta, path)
    identity = header.get("identity", [])
    if not isinstance(identity, list) or not all(isinstance(n, str) and n for n in identity):
        raise _fail(path, "header key 'identity'", "is not a list of module names")
    sums = header.get("checksums")
    if sums is not None and (
        not isinstance(sums, dict) or not all(_is_int(v) and 0 <= v < 2**32 for v in sums.values())
    ):
        raise _fail(path, "header key 'checksums'", "is not a map of CRC-32 values")
    arch = header.get("architecture")
    if arch is not None and not isinstance(arch, dict):
        raise _fail(path, "header key 'architecture'", f"is {arch!r}")


# --------------------------------------------------------------------------------------------
# 2. the size of a model built from the header
# --------------------------------------------------------------------------------------------


MAX_ARCH_JSON = 1 << 16  # bytes of constructor arguments: real ones are a few hundred


def check_architecture_size(name: str, kwargs: dict[str, Any], path: Path, build: Any) -> None:
    """Build the recorded architecture on the meta device (no memory) and refuse it when it
    holds more weights than the file can store: every weight takes at least one bit.

    The constructor arguments are capped at :data:`MAX_ARCH_JSON` bytes first (a list of a
    million layer widths would cost minutes and gigabytes in module objects alone). A model
    class whose constructor cannot run on the meta device is built without this cap (logged).
    """
    if len(json.dumps(kwargs)) > MAX_ARCH_JSON:
        raise _fail(path, "header key 'architecture'", f"has over {MAX_ARCH_JSON} bytes of kwargs")
    limit = 8 * path.stat().st_size
    try:
        with torch.device("meta"):
            skeleton = build(name, **kwargs)
        numel = sum(int(p.numel()) for p in skeleton.parameters())
    except (QDistillError, TypeError, ValueError, OverflowError, MemoryError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _fail(path, "header key 'architecture'", f"cannot be built ({first})") from None
    except (RuntimeError, NotImplementedError) as e:  # an op the meta device does not run
        log.warning("%s: cannot size %r on the meta device (%s); building it", path, name, e)
        return
    if numel > limit:
        raise _fail(
            path,
            "header key 'architecture'",
            f"describes {numel:,} weights, more than a {limit // 8:,}-byte file can hold",
        )


# --------------------------------------------------------------------------------------------
# 3. which modules a header may replace
# --------------------------------------------------------------------------------------------


def _module(model: nn.Module, name: str, path: Path, what: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise FileFormatError(
            f"{path}: {what} {name!r} in the file does not exist in the given "
            f"{type(model).__name__}; pass the model the file was saved from"
        ) from None


def check_targets(model: nn.Module, header: dict[str, Any], path: Path) -> None:
    """Every module the header replaces exists and is of a kind it may replace."""
    for name in header.get("identity", []):
        target = _module(model, name, path, "module")
        if not isinstance(target, REPLACEABLE_BY_IDENTITY):
            raise _fail(
                path,
                f"header key 'identity' entry {name!r}",
                f"names a {type(target).__name__}; only a BatchNorm may become Identity",
            )
    targets = _targets()
    for name, meta in header.get("layers", {}).items():
        target = _module(model, name, path, "layer")
        kind = layer_kind(meta)
        conv1d = kind == "linear" and is_hf_conv1d(target)  # GPT-2's Conv1D is a Linear
        if not (isinstance(target, targets[kind]) or conv1d):
            raise _fail(
                path, f"layer {name!r}", f"is a packed {kind} but the model has a "
                f"{type(target).__name__} there"
            )  # fmt: skip
        expected = linear_weight_shape(target)
        if tuple(meta["shape"]) != expected:
            raise FileFormatError(
                f"{path}: layer {name!r} has weight shape {tuple(meta['shape'])} in the "
                f"file but {expected} in the model; pass the matching architecture"
            )
        _check_geometry(target, meta, path, name)
        bn = meta.get("folded_bn")
        if bn is not None:
            target = _module(model, bn, path, "module")
            if not isinstance(target, REPLACEABLE_BY_IDENTITY):
                raise _fail(
                    path,
                    f"layer {name!r} folded_bn",
                    f"names a {type(target).__name__}; only a BatchNorm is folded",
                )


def _check_geometry(target: nn.Module, meta: dict[str, Any], path: Path, name: str) -> None:
    """A conv's stride/padding/dilation/groups and an embedding's padding_idx must be the
    model's: the architecture, not the header, decides how a layer is wired."""
    from qdistill.pack.modules import conv_params

    if "conv" in meta:
        own = getattr(target, "conv", None)
        if own is None:
            try:
                own = conv_params(target)
            except NotImplementedError as exc:
                raise _fail(path, f"layer {name!r}", f"cannot be packed ({exc})") from None
        own = {k: list(v) if isinstance(v, tuple) else v for k, v in own.items()}
        if own != meta["conv"]:
            raise _fail(path, f"layer {name!r} conv", f"is {meta['conv']} but the model's is {own}")
    if "embedding" in meta:
        pad = meta["embedding"].get("padding_idx")
        own_pad = getattr(target, "padding_idx", None)
        if pad is not None and pad < 0:
            pad += meta["shape"][0]
        if pad != own_pad:
            raise _fail(
                path, f"layer {name!r} embedding.padding_idx", f"is {pad}, the model's {own_pad}"
            )


# --------------------------------------------------------------------------------------------
# 4. tensors against the header, from the index only
# --------------------------------------------------------------------------------------------


def _needs_zero_point(fmt: Format) -> str | None:
    """``"int"`` / ``"float"`` for formats that store a zero point per block (their storage
    descriptor says so), else None."""
    zero = storage_of(fmt).zero
    return zero if zero in ("int", "float") else None


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "BOOL": torch.bool,
}  # fmt: skip


def tensor_index(f: Any, path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` of every tensor of an open safetensors file, read from its
    index (no tensor data is read)."""
    index = {}
    for key in f.keys():
        try:
            sl = f.get_slice(key)
            dtype, shape = _DTYPES.get(sl.get_dtype()), tuple(int(s) for s in sl.get_shape())
        except Exception as exc:  # safetensors' own errors have no common base class
            raise _fail(path, f"tensor {key!r}", f"cannot be read ({exc})") from None
        if dtype is None:
            raise _fail(path, f"tensor {key!r}", f"has dtype {sl.get_dtype()}")
        index[key] = (dtype, shape)
    return index


def check_layer_tensors(
    name: str,
    meta: dict[str, Any],
    info: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    target: nn.Module,
    path: Path,
) -> None:
    """The packed tensors of layer ``name`` against its header entry and the model's layer.

    ``info`` maps every tensor name in the file to its (dtype, shape) from safetensors' index.
    """
    fmt = format_from_dict(meta["format"])
    shape = tuple(meta["shape"])
    numel = math.prod(shape)
    p = name + "."

    def tensor(key: str) -> tuple[torch.dtype, tuple[int, ...]] | None:
        return info.get(p + key)

    codes = tensor("weight_codes")
    if codes is None or tensor("weight_scale") is None:
        raise FileFormatError(f"{path}: the packed weight of {name!r} is missing; corrupt")
    if codes[0] != torch.uint8 or len(codes[1]) != 1:
        raise _fail(path, f"tensor '{p}weight_codes'", f"is {codes[0]} {codes[1]}, not 1-D uint8")
    nbytes = codes[1][0]
    if meta.get("entropy"):
        lengths = [n for n in meta["entropy"]["lengths"] if n > 0]
        low, high = -(-numel * min(lengths) // 8), -(-numel * max(lengths) // 8)
        if not low <= nbytes <= high:
            raise _fail(
                path, f"tensor '{p}weight_codes'",
                f"holds {nbytes} bytes; {numel} Huffman codes need {low}..{high}",
            )  # fmt: skip
    elif nbytes != storage_of(fmt).nbytes(numel):
        raise FileFormatError(
            f"{path}: tensor '{p}weight_codes' holds {nbytes} bytes, expected "
            f"{storage_of(fmt).nbytes(numel)}; the file is truncated or corrupt"
        )
    blocks = storage_of(fmt).n_scales(shape)
    _expect_float(tensor("weight_scale"), blocks, path, p + "weight_scale")
    zp_kind, zp = _needs_zero_point(fmt), tensor("weight_zero_point")
    if zp_kind is None and zp is not None:
        raise _fail(
            path, f"tensor '{p}weight_zero_point'",
            f"is present but the format {fmt} has none (was 'symmetric' edited?)",
        )  # fmt: skip
    if zp_kind is not None:
        if zp is None:
            raise _fail(path, f"tensor '{p}weight_zero_point'", f"is missing; {fmt} needs it")
        if zp_kind == "float":
            _expect_float(zp, blocks, path, p + "weight_zero_point")
        elif zp[0].is_complex or zp[0] == torch.bool or math.prod(zp[1]) not in (1, blocks):
            raise _fail(path, f"tensor '{p}weight_zero_point'", f"is {zp[0]} {zp[1]}")
    out = shape[0]
    bias = tensor("bias")
    has_bias = getattr(target, "bias", None) is not None
    if bias is None and has_bias:
        raise _fail(path, f"tensor '{p}bias'", "is missing but the model's layer has a bias")
    if bias is not None:
        if layer_kind(meta) == "embedding":
            raise _fail(path, f"tensor '{p}bias'", "is present on an embedding")
        # a bias the model's layer lacks is legitimate: BatchNorm folding gives the conv one
        _expect_float(bias, out, path, p + "bias")
    act_fmt = meta.get("activations")
    act, act_zp = tensor("act_scale"), tensor("act_zero_point")
    if act is not None:
        if act_fmt is None:
            raise _fail(path, f"tensor '{p}act_scale'", "is present without an activation format")
        act_spec = meta["activations"]
        n = math.prod(act[1])
        if act_spec.get("group_size") is None and act_spec.get("axis") is None:
            need: tuple[int, ...] = (1,)  # per tensor
        elif isinstance(act_spec.get("axis"), int):  # per input channel / feature
            need = (shape[1] * (meta["conv"]["groups"] if "conv" in meta else 1),)
        else:
            need = tuple(range(1, max(shape[1:]) + 1))
        if not act[0].is_floating_point or n not in need:
            raise _fail(path, f"tensor '{p}act_scale'", f"is {act[0]} {act[1]}")
    if act_zp is not None and (act is None or math.prod(act_zp[1]) != math.prod(act[1])):
        raise _fail(path, f"tensor '{p}act_zero_point'", "does not match act_scale")


def _expect_float(
    t: tuple[torch.dtype, tuple[int, ...]] | None, numel: int, path: Path, key: str
) -> None:
    if t is None:
        raise _fail(path, f"tensor '{key}'", "is missing")
    if not t[0].is_floating_point or math.prod(t[1]) != numel:
        raise _fail(path, f"tensor '{key}'", f"is {t[0]} {t[1]}; expected {numel} floats")


# --------------------------------------------------------------------------------------------
# 5. tensor values
# --------------------------------------------------------------------------------------------


def tensor_checksum(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's raw bytes (row-major, its own dtype)."""
    flat = t.detach().contiguous().reshape(-1)
    return zlib.crc32(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")


def check_checksum(key: str, t: torch.Tensor, header: dict[str, Any], path: Path) -> None:
    """Compare a tensor just read with the CRC-32 the header recorded for it (if any)."""
    sums = header.get("checksums")
    if sums is None:
        return
    if key not in sums:
        raise _fail(path, f"tensor {key!r}", "has no checksum although the file records them")
    if tensor_checksum(t) != sums[key]:
        raise _fail(path, f"tensor {key!r}", "fails its CRC-32 check (bits flipped on disk?)")


def _finite_positive(t: torch.Tensor, path: Path, key: str, positive: bool = True) -> None:
    bad = ~torch.isfinite(t.float())
    if positive:
        bad |= t.float() <= 0
    if bool(bad.any()):
        v = float(t.reshape(-1)[bad.reshape(-1)][0])
        need = "finite and > 0" if positive else "finite"
        raise _fail(path, f"tensor {key!r}", f"holds {v}; it must be {need}")


def _code_range(fmt: Format) -> tuple[int, int]:
    """Smallest and largest valid unsigned code of ``fmt`` (from its storage descriptor)."""
    st = storage_of(fmt)
    return st.qmin, st.qmax


def check_layer_values(
    name: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor | None], path: Path
) -> None:
    """Scales, zero points and codes of one layer (``weight_codes`` already decoded from
    Huffman, if it was, to the fixed-length layout)."""
    fmt = format_from_dict(meta["format"])
    p = name + "."
    # GGUF formats (Q4_0: d = max / -8; an all-zero block: d = 0) declare signed scales
    signed = storage_of(fmt).signed_scales
    _finite_positive(tensors["weight_scale"], path, p + "weight_scale", positive=not signed)
    zp = tensors.get("weight_zero_point")
    if zp is not None:
        if zp.is_floating_point():
            _finite_positive(zp, path, p + "weight_zero_point", positive=False)
        st = storage_of(fmt)
        if st.zero == "int":
            zf = zp.double()
            if bool(((zf < 0) | (zf > st.qmax) | ~torch.isfinite(zf)).any()):
                raise _fail(
                    path, f"tensor '{p}weight_zero_point'",
                    f"holds {float(zf.max()) if bool((zf > 0).any()) else float(zf.min())}, "
                    f"outside 0..{st.qmax} for {st.bits} bits",
                )  # fmt: skip
    for key in ("act_scale", "bias"):
        t = tensors.get(key)
        if t is not None:
            _finite_positive(t, path, p + key, positive=key == "act_scale")
    numel = math.prod(meta["shape"])
    st = storage_of(fmt)
    lo, hi = st.qmin, st.qmax
    if st.all_codes_valid:
        return  # every bit pattern is a valid code
    codes = tensors["weight_codes"]
    if st.packing == "trits" and bool((codes > 242).any()):
        raise _fail(path, f"tensor '{p}weight_codes'", "holds a byte > 242 (not five trits)")
    values = unpack_for(codes, fmt, numel).numpy()
    bad = np.flatnonzero((values < lo) | (values > hi))
    if bad.size:
        i = int(bad[0])
        raise _fail(
            path, f"tensor '{p}weight_codes'",
            f"holds code {int(values[i])} at weight {i}; {fmt} codes are {lo}..{hi}",
        )  # fmt: skip
