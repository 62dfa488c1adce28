"""Small reference architectures used by the demo, the benchmarks and the tests, by name."""

from qdistill.models.cnn import MLP, ConvNet, StudentCNN, TeacherCNN
from qdistill.models.registry import MODELS, arch_record, build_model, register_model

__all__ = [
    "MLP",
    "MODELS",
    "ConvNet",
    "StudentCNN",
    "TeacherCNN",
    "arch_record",
    "build_model",
    "register_model",
]
