"""ONNX export with QuantizeLinear / DequantizeLinear pairs, for onnxruntime and other runtimes.

Each quantized Linear / Conv2d (fake-quant or packed) becomes a float layer whose weight comes
out of a DequantizeLinear node with the layer's own codes and scales:

* int8 symmetric weights (per tensor or channel): a DequantizeLinear reading the one-byte codes
  from an initializer (the standard "QDQ" form that onnxruntime folds into integer kernels;
  torch exports a QuantizeLinear of the float weight, which the export replaces by the codes it
  computes, so the file holds a byte per weight). By default the
  codes are stored as uint8 with zero point 128 (the same values): onnxruntime's u8s8 kernels
  on x86 CPUs without VNNI (AVX2, AVX-512F) add pairs of products in saturating int16 and lose
  a few percent of the output (past a 0.2% tolerance on a small CNN in our tests), while its
  u8u8 kernels are exact. ``weight_dtype="int8"`` keeps signed codes for VNNI targets, where
  u8s8 is exact and fastest (onnxruntime's quantization docs describe the same trade-off);
* 4-bit integer weights (per channel, or per group along the input): a ``uint4`` initializer
  holding the very codes of the packed file, with its scales and zero points, dequantized by
  DequantizeLinear with ``block_size`` (ONNX opset 21; the file is exported at opset 20 and its
  default-domain import raised to 21, whose changes over 20 only add types and attributes);
* inputs with a calibrated static asymmetric 8-bit range: a uint8 QDQ pair; per-token dynamic
  int8 inputs (``IntFormat(8, axis="row")``, W8A8 / W1.58A8): the same rounding in plain ONNX
  ops (ReduceMax, Div, Round, Clip, Mul), so the ONNX model computes what qdistill computes.

Formats ONNX cannot express this way (ternary, 2/3-bit, FP8, learned points) and quantized
embedding tables are exported as their dequantized float values: the same function, in float.
The export uses torch's TorchScript-based exporter (torch maps its fake-quantize ops to QDQ
nodes). Spec:
https://onnx.ai/onnx/operators/onnx__DequantizeLinear.html
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qdistill.errors import ConfigError, QDistillError
from qdistill.formats.storage import Storage, storage_of
from qdistill.pack import registry
from qdistill.pack.bits import unpack_for
from qdistill.pack.modules import PackedEmbedding, PackedMixin, pack_layer
from qdistill.quant.modules import is_quantized

INT4_OPSET = 21


class _QDQLayer(nn.Module):
    """A float Linear/Conv2d whose weight (and input) go through torch fake-quant ops."""

    def __init__(self, packed: PackedMixin, weight_dtype: str = "uint8") -> None:
        super().__init__()
        w = packed.unpacked_weight()
        self.conv = getattr(packed, "conv", None)
        self.weight = nn.Parameter(w, requires_grad=False)
        self.bias = None if packed.bias is None else nn.Parameter(packed.bias.clone(), False)
        self.weight_qdq: tuple | None = None
        # the registry's export entry for these codes (by their storage descriptor)
        codes = export_codes(packed)
        if codes is not None and codes["kind"] == "int8":
            self.register_buffer("w_scale", codes["scale"])
            offset = codes["zero_point"] if weight_dtype == "uint8" else 0
            self.register_buffer("w_zero", torch.full((w.shape[0],), offset, dtype=torch.int32))
            self.weight_qdq = (offset - 128, offset + 127)
        act = packed.act_format
        kind = registry.act_kind(act)
        self.act_qdq: tuple[float, int] | None = None
        if kind == "uint8_tensor" and packed.act_scale is not None:
            self.act_qdq = (float(packed.act_scale), int(packed.act_zero_point))
        # per-token dynamic int8 (IntFormat(8, axis="row")), rounded as IntFormat rounds it
        self.act_row = kind == "int8_row"
        self.act_eps = float(getattr(act, "eps", None) or 0.0)  # BitNet's floor of max|x|
        self.int4 = codes if codes is not None and codes["kind"] == "uint4" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_qdq is not None:
            x = torch.fake_quantize_per_tensor_affine(x, self.act_qdq[0], self.act_qdq[1], 0, 255)
        elif self.act_row:
            amax = x.abs().amax(dim=-1, keepdim=True)
            if self.act_eps:
                amax = torch.clamp(amax, min=self.act_eps)
            scale = torch.clamp(amax / 127.0, min=1e-12)
            x = torch.clamp(torch.round(x * (1.0 / scale)), -127.0, 127.0) * scale
        w = self.weight
        if self.weight_qdq is not None:
            lo, hi = self.weight_qdq
            w = torch.fake_quantize_per_channel_affine(w, self.w_scale, self.w_zero, 0, lo, hi)
        if self.conv is None:
            return F.linear(x, w, self.bias)
        c = self.conv
        return F.conv2d(x, w, self.bias, c["stride"], c["padding"], c["dilation"], c["groups"])


def export_codes(packed: PackedMixin) -> dict | None:
    """How the ONNX export stores ``packed``'s weight codes: the dict of the first registry
    entry with an ``export`` function that accepts its storage, or None (float weights)."""
    st, site = storage_of(packed.weight_format), registry.site_of(packed)
    entry = registry.select(st, site, role="export")
    return None if entry is None else entry.export(packed, st)


def _per_row_int8(st: Storage, site: registry.Site) -> bool:
    return registry.offset128(st) and st.scale_per_row


def _int8_codes(packed: PackedMixin, st: Storage) -> dict:
    """8-bit codes ``q + 128`` with one scale per output channel: a per-channel QDQ pair of
    the float weight, which :func:`_int8_initializers` turns back into these codes."""
    out_f = packed.weight_shape[0]
    scale = packed.weight_scale.float().reshape(-1)
    if scale.numel() == 1:
        scale = scale.expand(out_f)
    return {"kind": "int8", "scale": scale.contiguous(), "zero_point": st.offset}


def _uint4_rows(st: Storage, site: registry.Site) -> bool:
    return registry.integer_codes(st, 4) and st.row_group(site.row_len) is not None


def _int4_codes(packed: PackedMixin, st: Storage) -> dict:
    """Codes ``[O, I]``, scales and zero points of a 4-bit integer weight whose scale blocks
    ONNX can describe (per output channel, or groups within a row)."""
    shape = packed.weight_shape
    out_f, per_row = shape[0], int(torch.Size(shape[1:]).numel())
    g = st.group_size
    blocks = 1 if g is None else per_row // g
    codes = unpack_for(packed.packed_codes(), packed.weight_format, out_f * per_row)
    codes = codes.reshape(out_f, per_row)
    scale = packed.weight_scale.float().reshape(-1)
    zp = packed.weight_zero_point
    zp = torch.full_like(scale, st.offset, dtype=torch.uint8) if zp is None else zp.reshape(-1)
    if scale.numel() == 1:  # per tensor: one scale for every row
        scale, zp = scale.expand(out_f), zp.expand(out_f)
    return {
        "kind": "uint4",
        "codes": codes,
        "scale": scale.reshape(out_f, blocks).contiguous(),
        "zero_point": zp.to(torch.uint8).reshape(out_f, blocks).contiguous(),
        "group_size": g,
        "shape": tuple(shape),
    }


_QDQ_MODULES = ("linear", "conv")
registry.register(
    registry.Kernel("onnx_int8", _QDQ_MODULES, None, _per_row_int8, export=_int8_codes)
)
registry.register(
    registry.Kernel("onnx_uint4", _QDQ_MODULES, None, _uint4_rows, export=_int4_codes)
)


WEIGHT_DTYPES = ("uint8", "int8")


def export_twin(model: nn.Module, weight_dtype: str = "uint8") -> nn.Module:
    """A copy of ``model`` whose quantized layers are exportable QDQ layers."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ConfigError(
            f"weight_dtype={weight_dtype!r} is not one of {WEIGHT_DTYPES}: 'uint8' (exact in "
            "onnxruntime on every x86 CPU) or 'int8' (fastest on CPUs with VNNI)"
        )
    twin = copy.deepcopy(model).eval()
    for name, m in list(twin.named_modules()):
        if is_quantized(m):
            m = pack_layer(m)
        if isinstance(m, PackedMixin):
            parent, _, child = name.rpartition(".")
            new: nn.Module = (
                nn.Embedding.from_pretrained(m.unpacked_weight(), padding_idx=m.padding_idx)
                if isinstance(m, PackedEmbedding)  # a Gather of the dequantized table
                else _QDQLayer(m, weight_dtype)
            )
            setattr(twin.get_submodule(parent) if parent else twin, child, new)
    return twin


def example_input_for(model: nn.Module) -> torch.Tensor:
    """A batch-1 input for ``model``: from its recorded architecture (``qd_arch`` kwargs
    ``in_channels`` / ``input_size``) or from a first layer that is a Linear."""
    kw = (getattr(model, "qd_arch", None) or {}).get("kwargs", {})
    if "input_size" in kw or "in_channels" in kw:
        size = kw.get("input_size", 28)
        return torch.randn(1, kw.get("in_channels", 1), size, size)
    for m in model.modules():
        shape = getattr(m, "weight_shape", None) or getattr(
            getattr(m, "weight", None), "shape", None
        )
        if shape is None:
            continue
        if len(shape) == 2 and not hasattr(m, "conv"):
            return torch.randn(1, int(shape[1]))
        break
    raise ConfigError("cannot tell the model's input shape; pass example_input=torch.randn(...)")


def _constant(graph: object, name: str) -> object | None:
    """The numpy value of an initializer or Constant node output called ``name``, or None."""
    from onnx import numpy_helper

    for t in graph.initializer:  # type: ignore[attr-defined]
        if t.name == name:
            return numpy_helper.to_array(t)
    for node in graph.node:  # type: ignore[attr-defined]
        if node.output and node.output[0] == name:
            if node.op_type == "Identity":  # the exporter shares equal zero points this way
                return _constant(graph, node.input[0])
            if node.op_type == "Constant":
                return next(
                    (numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value"), None
                )
    return None


def _int8_initializers(graph: object) -> int:
    """Store 8-bit weights as codes: each QuantizeLinear of a float weight initializer (what
    torch exports for fake_quantize_per_channel_affine) is replaced by the int8 / uint8 codes it
    would compute, which its DequantizeLinear then reads, so the file holds one byte per weight
    instead of four (the usual QDQ form of a quantized model's weights)."""
    import numpy as np
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}  # type: ignore[attr-defined]
    done = 0
    for node in list(graph.node):  # type: ignore[attr-defined]
        if node.op_type != "QuantizeLinear" or node.input[0] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[0]])
        scale = _constant(graph, node.input[1])
        zp = _constant(graph, node.input[2]) if len(node.input) > 2 else None
        if w.ndim < 2 or scale is None or zp is None:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * w.ndim
        if scale.size > 1:
            shape[axis] = -1
        info = np.iinfo(zp.dtype)
        q = np.rint(w / scale.reshape(shape)) + zp.reshape(shape).astype(np.int32)
        codes = np.clip(q, info.min, info.max).astype(zp.dtype)
        init = numpy_helper.from_array(codes, node.output[0])
        graph.initializer.remove(inits[node.input[0]])  # type: ignore[attr-defined]
        graph.initializer.append(init)  # type: ignore[attr-defined]
        graph.node.remove(node)  # type: ignore[attr-defined]
        done += 1
    return done


def _int4_initializers(graph: object, twin: nn.Module) -> int:
    """Swap each 4-bit layer's float weight initializer for uint4 codes + DequantizeLinear."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = {t.name: t for t in graph.initializer}  # type: ignore[attr-defined]
    nodes = []
    for name, m in twin.named_modules():
        q = getattr(m, "int4", None)
        key = f"{name}.weight"
        if not q or key not in inits:
            continue
        out_f = q["shape"][0]
        codes = q["codes"].reshape(out_f, -1).numpy()
        base = key.replace(".", "_")
        w = helper.make_tensor(
            f"{base}_q", TensorProto.UINT4, list(codes.shape), codes.ravel().tolist()
        )
        grouped = q["group_size"] is not None
        scale = q["scale"].numpy() if grouped else q["scale"].reshape(-1).numpy()
        zp = q["zero_point"].numpy() if grouped else q["zero_point"].reshape(-1).numpy()
        s = numpy_helper.from_array(scale, f"{base}_scale")
        z = helper.make_tensor(f"{base}_zp", TensorProto.UINT4, list(zp.shape), zp.ravel().tolist())
        attrs = {"axis": 1, "block_size": q["group_size"]} if grouped else {"axis": 0}
        flat = f"{base}_dq"
        nodes.append(
            helper.make_node("DequantizeLinear", [w.name, s.name, z.name], [flat], **attrs)
        )
        shape = numpy_helper.from_array(
            torch.tensor(q["shape"], dtype=torch.int64).numpy(), f"{base}_shape"
        )
        nodes.append(helper.make_node("Reshape", [flat, shape.name], [key]))
        graph.initializer.remove(inits[key])  # type: ignore[attr-defined]
        graph.initializer.extend([w, s, z, shape])  # type: ignore[attr-defined]
    for i, node in enumerate(nodes):
        graph.node.insert(i, node)  # type: ignore[attr-defined]
    del onnx
    return len(nodes) // 2


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_input: torch.Tensor | None = None,
    opset: int | None = None,
    weight_dtype: str = "uint8",
) -> Path:
    """Write ``model`` (fake-quant, packed or float) as an ONNX file with QDQ nodes.

    ``example_input`` defaults to :func:`example_input_for`; the batch axis is dynamic.
    ``opset`` defaults to 17, or 21 when the model has 4-bit layers (uint4 initializers).
    ``weight_dtype`` is how 8-bit weight codes are stored: ``"uint8"`` (zero point 128, exact
    in onnxruntime everywhere) or ``"int8"`` (zero point 0, fastest where the CPU has VNNI;
    on AVX2-only CPUs onnxruntime's u8s8 kernels saturate and drift by a few percent).
    """
    path = Path(path)
    if example_input is None:
        example_input = example_input_for(model)
    twin = export_twin(model, weight_dtype)
    has_int4 = any(getattr(m, "int4", None) for m in twin.modules())
    if opset is None:
        opset = INT4_OPSET if has_int4 else 17
    if has_int4 and opset < INT4_OPSET:
        raise ConfigError(f"4-bit weights need ONNX opset {INT4_OPSET} or later, not {opset}")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                twin,
                (example_input,),
                str(path),
                dynamo=False,
                opset_version=min(opset, 20),  # the TorchScript exporter stops at 20
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                do_constant_folding=not has_int4,  # keep the weights' names for the rewrite
            )
        has_int8 = any(getattr(m, "weight_qdq", None) for m in twin.modules())
        if has_int4 or has_int8 or opset > 20:
            import onnx

            proto = onnx.load(str(path))
            _int4_initializers(proto.graph, twin)
            _int8_initializers(proto.graph)
            for imp in proto.opset_import:
                if imp.domain in ("", "ai.onnx"):
                    imp.version = opset
            proto.ir_version = max(proto.ir_version, 10)  # uint4 needs IR 10
            onnx.checker.check_model(proto)
            onnx.save(proto, str(path))
    except ConfigError:
        raise
    except Exception as exc:  # the exporter's errors name torch internals; say what failed
        raise QDistillError(f"ONNX export of {type(model).__name__} failed: {exc}") from exc
    return path


__all__ = ["example_input_for", "export_onnx", "export_twin"]
