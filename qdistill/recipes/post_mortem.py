"""Post-training quantization: quantize a trained float model, calibrate, no training.

* ``post_mortem`` is the baseline of Polino, Pascanu & Alistarh (2018), Sec. 5 ("post-mortem
  quantization"): the float student's weights are rounded with the same quantizer used in
  training. It is cheap and works at 8 bits; at 2 bits it collapses, which is what quantized
  distillation fixes.
* ``ptq`` is the post-training recipe of the quantization whitepaper (Krishnamoorthi 2018,
  Sec. 3): optionally fold BatchNorm, quantize, then calibrate static activation ranges (and
  optionally MSE-clipped weight ranges) on a few batches.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

from torch import nn

from qdistill.quant import QuantConfig, calibrate, quantize_


def ptq(
    model: nn.Module,
    config: QuantConfig,
    calibration_data: Iterable | None = None,
    *,
    observer: str = "minmax",
    num_batches: int = 16,
    weights: str = "minmax",
    progress: bool = True,
) -> nn.Module:
    """A quantized, calibrated copy of ``model`` in eval mode (the original is untouched)."""
    quantized = quantize_(copy.deepcopy(model), config)
    calibrate(
        quantized,
        calibration_data,
        observer=observer,
        num_batches=num_batches,
        weights=weights,
        progress=progress,
    )
    return quantized.eval()


def post_mortem(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Round a trained float model's weights (Polino et al.'s baseline); no data needed."""
    return ptq(model, config, None)
