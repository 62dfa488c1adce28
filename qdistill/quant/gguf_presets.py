"""Quantization presets in GGUF's own block formats: train in the format llama.cpp executes.

``qd.quantize_(model, qd.gguf_q4_0())`` makes every Linear layer (but the output head) compute
with exactly the values ggml's ``Q4_0`` quantizer gives its float weight; after distillation,
:func:`qdistill.export_gguf` writes those codes and scales into the GGUF file unchanged, so the
file holds the trained numbers (no re-quantization at export). The formats are in
:mod:`qdistill.formats.gguf`.

The output head (``keep_last``) and the embeddings stay in float, as llama.cpp's converter keeps
the output and embedding tables at higher precision than the blocks; the export writes them as
F32 (or F16). Activations stay float: llama.cpp quantizes them itself at run time (to Q8_0 /
Q8_K blocks), which no training format can mirror for every backend.
"""

from __future__ import annotations

from typing import Any

from qdistill.formats.gguf import GGUFQ4_0, GGUFQ8_0, GGUFTernary
from qdistill.quant.config import QuantConfig


def _config(fmt: Any, overrides: dict[str, Any]) -> QuantConfig:
    spec: dict[str, Any] = {"weights": fmt, "keep_last": True, **overrides}
    return QuantConfig(**spec)


def gguf_q8_0(**overrides: Any) -> QuantConfig:
    """GGUF ``Q8_0`` (8.5 bits a weight): blocks of 32, fp16 scale ``max|x|/127``."""
    return _config(GGUFQ8_0(), overrides)


def gguf_q4_0(**overrides: Any) -> QuantConfig:
    """GGUF ``Q4_0`` (4.5 bits a weight): blocks of 32, fp16 scale ``m/-8``, codes 0..15."""
    return _config(GGUFQ4_0(), overrides)


def gguf_tq2_0(scale: str = "absmean", per_block: bool = False, **overrides: Any) -> QuantConfig:
    """GGUF ``TQ2_0`` (2.06 bits a weight): ternary weights, fp16 scale per block of 256.

    ``scale="absmean"`` (default) is BitNet b1.58's per-tensor ``mean|W|`` (per block of 256 with
    ``per_block=True``), rounded to fp16 so that TQ2_0 blocks hold it exactly; ``"absmax"`` is
    ggml's own quantizer (per block). A layer whose rows are not a multiple of 256 long has no
    TQ2_0 layout; :func:`qdistill.export_gguf` stores its ternary values exactly in ``Q4_0``
    blocks instead (4.5 bits a weight), and says so.
    """
    group = 256 if (per_block or scale == "absmax") else None
    return _config(GGUFTernary(group_size=group, gguf_type="TQ2_0", scale=scale), overrides)


def gguf_tq1_0(scale: str = "absmean", per_block: bool = False, **overrides: Any) -> QuantConfig:
    """GGUF ``TQ1_0`` (1.69 bits a weight, base-3 packing): as :func:`gguf_tq2_0` otherwise."""
    group = 256 if (per_block or scale == "absmax") else None
    return _config(GGUFTernary(group_size=group, gguf_type="TQ1_0", scale=scale), overrides)


PRESETS = {"Q8_0": gguf_q8_0, "Q4_0": gguf_q4_0, "TQ2_0": gguf_tq2_0, "TQ1_0": gguf_tq1_0}
