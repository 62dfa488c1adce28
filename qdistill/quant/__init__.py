"""Fake-quant modules with straight-through gradients, calibration, and ``quantize_``."""

from qdistill.quant.bn_fold import QuantConvBn2d, fold_batchnorm
from qdistill.quant.calibrate import calibrate
from qdistill.quant.config import LayerRule, QuantConfig
from qdistill.quant.modules import (
    QuantConv2d,
    QuantEmbedding,
    QuantLinear,
    deterministic,
    is_quantized,
)
from qdistill.quant.observers import OBSERVERS, make_observer
from qdistill.quant.quantize import QuantPlan, quantize_

__all__ = [
    "OBSERVERS",
    "LayerRule",
    "QuantConfig",
    "QuantConv2d",
    "QuantConvBn2d",
    "QuantEmbedding",
    "QuantLinear",
    "QuantPlan",
    "calibrate",
    "deterministic",
    "fold_batchnorm",
    "is_quantized",
    "make_observer",
    "quantize_",
]
