"""Post-mortem quantization: round a trained float model, no further training.

The baseline of Polino, Pascanu & Alistarh (2018), Sec. 5 ("post-mortem quantization"): the
student is trained in full precision, then its weights are quantized with the same uniform
bucketed quantizer. It is cheap and works at 8 bits; at 2 bits it collapses, which is what
quantized distillation fixes.
"""

from __future__ import annotations

import copy

from torch import nn

from qdistill.quant import QuantConfig, quantize_


def post_mortem(model: nn.Module, config: QuantConfig) -> nn.Module:
    """A quantized copy of ``model`` (the original is left untouched), in eval mode."""
    quantized = quantize_(copy.deepcopy(model), config)
    return quantized.eval()
