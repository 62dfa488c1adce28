"""The methods, each a short composition of quant/ + distill/ + train/."""

from qdistill.recipes.post_mortem import post_mortem, ptq
from qdistill.recipes.qat import TrainSettings, qat, quantized_distillation, train_float

__all__ = ["TrainSettings", "post_mortem", "ptq", "qat", "quantized_distillation", "train_float"]
