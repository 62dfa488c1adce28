"""Small reference architectures used by the demo, the benchmarks and the tests."""

from qdistill.models.cnn import MLP, ConvNet
from qdistill.models.registry import MODELS, build_model, register_model

__all__ = ["MLP", "MODELS", "ConvNet", "build_model", "register_model"]
