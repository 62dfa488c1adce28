"""Fake-quant modules with straight-through gradients and the ``quantize_`` entry point."""

from qdistill.quant.config import QuantConfig
from qdistill.quant.modules import QuantConv2d, QuantLinear, deterministic, is_quantized
from qdistill.quant.quantize import QuantPlan, quantize_

__all__ = [
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "QuantPlan",
    "deterministic",
    "is_quantized",
    "quantize_",
]
