"""Export a Llama-architecture student to GGUF, the file llama.cpp (and bitnet.cpp) run.

``qd.export_gguf(model, "student.gguf", tokenizer)`` takes a transformers ``LlamaForCausalLM``
(float, fake-quant after ``quantize_`` with a :mod:`qdistill.quant.gguf_presets` preset, or packed
from ``qd.load``) and writes, with the ``gguf`` package's ``GGUFWriter``:

* the ``llama.*`` architecture keys llama.cpp reads (context length, width, blocks, FFN width,
  heads, key/value heads, RoPE dimension and base, RMSNorm epsilon, vocabulary size);
* the tokenizer (:mod:`qdistill.pack.gguf_tokenizer`), when one is given;
* every weight under llama.cpp's name (``token_embd``, ``blk.N.attn_q`` ... ``ffn_down``,
  ``output_norm``, ``output``): weights trained in a GGUF format as their own codes and fp16
  scales laid out in ggml blocks (:mod:`qdistill.pack.gguf_blocks`, no re-quantization), float
  weights as F32 (or F16 with ``float_type="f16"``), norms as F32.

The query and key projections are permuted the way llama.cpp's converter permutes them
(``convert_hf_to_gguf.py``, ``LlamaModel.permute``): transformers' Llama rotates the two halves
of each head (``rotate_half``), llama.cpp's ``llama`` architecture rotates adjacent pairs, so the
rows of each head are interleaved ``[0, d/2, 1, d/2 + 1, ...]``. A permutation of whole rows moves
whole blocks (blocks never straddle rows), so the exported values stay exact.

The file is written to a temporary name in the target folder and renamed when complete: an
error leaves no file behind.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qdistill.errors import QDistillError
from qdistill.formats.base import QuantizedTensor
from qdistill.formats.gguf import gguf_type_of
from qdistill.pack.bits import unpack_for
from qdistill.pack.gguf_blocks import gguf_bytes
from qdistill.pack.gguf_tokenizer import convert_tokenizer, write_vocab
from qdistill.pack.modules import PackedMixin
from qdistill.quant.modules import is_quantized

log = logging.getLogger(__name__)

SUPPORTED = "LlamaForCausalLM (model_type 'llama': SmolLM/SmolLM2, TinyLlama, Llama 2 and 3)"
FLOAT_TYPES = ("f32", "f16")
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


@dataclass
class GGUFExport:
    """What :func:`export_gguf` wrote: the path, each tensor's GGUF type, and notes."""

    path: Path
    types: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    file_type: str = ""

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for t in self.types.values():
            counts[t] = counts.get(t, 0) + 1
        kinds = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
        return f"wrote {self.path} ({self.file_type}; {len(self.types)} tensors: {kinds})"


def nearest_preset(fmt: Any) -> str:
    """The GGUF preset closest to a format that has no GGUF block type."""
    kind = fmt.to_dict().get("kind") if hasattr(fmt, "to_dict") else None
    bits = getattr(fmt, "bits", 8)
    if kind in ("ternary", "binary") or bits <= 2:
        return "qd.gguf_tq2_0()"
    return "qd.gguf_q4_0()" if bits <= 5 else "qd.gguf_q8_0()"


def permute_rows(a: np.ndarray, n_head: int) -> np.ndarray:
    """Interleave the two halves of each head's rows (llama.cpp's Q/K order for ``llama``)."""
    rows = a.shape[0]
    if rows % (2 * n_head):
        raise QDistillError(f"{rows} rows do not split into {n_head} heads of even size")
    return a.reshape(n_head, 2, rows // n_head // 2, -1).swapaxes(1, 2).reshape(a.shape)


def _check_llama(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if type(model).__name__ != "LlamaForCausalLM" or getattr(config, "model_type", None) != "llama":
        kind = getattr(config, "model_type", None)
        raise QDistillError(
            f"cannot export {type(model).__name__}"
            + (f" (model_type {kind!r})" if kind else "")
            + f" to GGUF; qdistill exports {SUPPORTED}"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise QDistillError(
            "GGUF export of Llama models with attention/MLP biases is not supported; "
            "export a model without biases (attention_bias=False, mlp_bias=False)"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise QDistillError(
            f"GGUF 'llama' uses SiLU; this model's hidden_act is {config.hidden_act!r}"
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        raise QDistillError(
            f"RoPE scaling {rope_type!r} is not exported to GGUF yet; qdistill exports default RoPE"
        )
    return config


def _rope_theta(config: Any) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def layer_qtensor(module: nn.Module) -> QuantizedTensor | None:
    """The codes and scales a quantized (fake-quant or packed) layer computes with, or None for
    a float layer."""
    if isinstance(module, PackedMixin):
        fmt, shape = module.weight_format, tuple(module.weight_shape)
        numel = int(torch.Size(shape).numel())
        codes = unpack_for(module.packed_codes(), fmt, numel).reshape(shape)
        return QuantizedTensor(codes, module.weight_scale, None, shape, fmt)
    if is_quantized(module):
        return module.weight_qtensor()  # type: ignore[operator]
    return None


def _float_array(t: torch.Tensor, float_type: str) -> np.ndarray:
    a = t.detach().float().cpu().numpy()
    return a.astype(np.float16) if (float_type == "f16" and a.ndim == 2) else a


def _tensor(
    module: nn.Module, name: str, gguf_name: str, float_type: str, out: GGUFExport
) -> tuple[np.ndarray, Any]:
    """``(array, raw GGML type or None)`` of one layer's weight."""
    import gguf

    q = layer_qtensor(module)
    if q is None:
        a = _float_array(module.weight, float_type)
        out.types[gguf_name] = "F16" if a.dtype == np.float16 else "F32"
        return a, None
    if gguf_type_of(q.fmt) is None:
        raise QDistillError(
            f"layer {name!r} has format {q.fmt}, which has no GGUF block type; train it with "
            f"the nearest GGUF preset, {nearest_preset(q.fmt)} (or keep it in float)"
        )
    if getattr(module, "act_format", None) is not None:
        warnings.warn(
            f"{name}: input quantization {module.act_format} is not stored in GGUF; "
            "llama.cpp quantizes activations its own way",
            stacklevel=3,
        )
    data, kind, note = gguf_bytes(q, name)
    if note:
        out.notes.append(note)
    out.types[gguf_name] = kind
    return data, gguf.GGMLQuantizationType[kind]


def _file_type(types: dict[str, str], sizes: dict[str, int]) -> Any:
    import gguf

    weight: dict[str, int] = {}
    for name, t in types.items():
        weight[t] = weight.get(t, 0) + sizes[name]
    quant = {t: n for t, n in weight.items() if t not in ("F32", "F16")}
    if quant:
        return gguf.LlamaFileType[f"MOSTLY_{max(quant, key=lambda t: quant[t])}"]
    return gguf.LlamaFileType.MOSTLY_F16 if "F16" in weight else gguf.LlamaFileType.ALL_F32


def _tied(hf: nn.Module, config: Any) -> bool:
    """lm_head is the input embedding (llama.cpp then reads token_embd for the output)."""
    head, emb = hf.get_submodule("lm_head"), hf.get_submodule("model.embed_tokens")
    if not getattr(config, "tie_word_embeddings", False):
        return False
    if layer_qtensor(head) is not None or layer_qtensor(emb) is not None:
        return False
    return head.weight is emb.weight or torch.equal(head.weight, emb.weight)


def export_gguf(
    model: nn.Module,
    path: str | os.PathLike[str],
    tokenizer: Any = None,
    *,
    float_type: str = "f32",
    tokenizer_pre: str | None = None,
    name: str | None = None,
) -> GGUFExport:
    """Write ``model`` (a Llama causal LM) as a GGUF file llama.cpp loads; see the module doc.

    Args:
        model: ``LlamaForCausalLM``, float, fake-quant or packed.
        path: the ``.gguf`` file to write (replaced atomically).
        tokenizer: its transformers fast tokenizer (byte-level BPE), or None (then the file holds
            the tensors and metadata only; llama.cpp needs a vocabulary to run text through it).
        float_type: ``"f32"`` (exact) or ``"f16"`` for the float 2-D weights (embeddings, head).
        tokenizer_pre: llama.cpp's pre-tokenizer name, when it cannot be read from the
            tokenizer.
        name: ``general.name`` (default: the model's ``name_or_path``).
    """
    import gguf

    if float_type not in FLOAT_TYPES:
        raise QDistillError(f"float_type={float_type!r}; use one of {FLOAT_TYPES}")
    config = _check_llama(model)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    vocab = convert_tokenizer(tokenizer, config.vocab_size, tokenizer_pre) if tokenizer else None

    out = GGUFExport(Path(path))
    tensors: list[tuple[str, np.ndarray, Any]] = []
    sizes: dict[str, int] = {}

    def add(module_name: str, gguf_name: str, heads: int | None = None) -> None:
        module = model.get_submodule(module_name)
        if isinstance(module, nn.Identity):
            raise QDistillError(f"{module_name} was removed from the model; GGUF needs it")
        if module_name.endswith("norm"):
            array, raw = module.weight.detach().float().cpu().numpy(), None
            out.types[gguf_name] = "F32"
        else:
            array, raw = _tensor(module, module_name, gguf_name, float_type, out)
        if heads is not None:
            array = permute_rows(array, heads)
        tensors.append((gguf_name, array, raw))
        sizes[gguf_name] = int(
            np.prod(getattr(module, "weight_shape", None) or tuple(module.weight.shape))
        )

    add("model.embed_tokens", "token_embd.weight")
    for i in range(config.num_hidden_layers):
        for hf_name, g_name in _LAYER_NAMES.items():
            heads = n_head if g_name == "attn_q" else n_kv if g_name == "attn_k" else None
            add(f"model.layers.{i}.{hf_name}", f"blk.{i}.{g_name}.weight", heads)
    add("model.norm", "output_norm.weight")
    if not _tied(model, config):
        add("lm_head", "output.weight")

    file_type = _file_type(out.types, sizes)
    out.file_type = file_type.name
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, "llama")
        writer.add_name(name or str(getattr(config, "_name_or_path", "") or "qdistill-student"))
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_rope_dimension_count(head_dim)
        if head_dim != config.hidden_size // n_head:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        writer.add_rope_freq_base(_rope_theta(config))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if vocab is not None:
            write_vocab(writer, vocab)
        for gguf_name, array, raw in tensors:
            writer.add_tensor(gguf_name, array, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    for note in out.notes:
        log.info("%s", note)
    return out
