"""qdistill: distillation and quantization together.

A full-precision teacher trains a low-bit student; the student ships with its weights truly
packed. The whole API in one breath::

    import qdistill as qd
    cfg = qd.QuantConfig(weights=qd.int4(group_size=64), rules={"classifier": None})
    student = qd.quantize_(student, cfg)                   # fake-quant in place
    run = qd.distill(teacher, student, loss=qd.KD(temperature=2, alpha=0.7))
    qd.fit(run, train_loader, epochs=10)                   # progress bar, checkpoints, resume
    qd.save(student, "student.qd.safetensors")             # truly packed
    fast = qd.load("student.qd.safetensors")               # runs on packed weights

Transformers to ternary (BitNet Distillation)::

    student, report = qd.bitdistill(qd.load_classifier("minilm", 10), train_loader,
                                    teacher=finetuned_fp, text_loader=general_text)
"""

from qdistill.data import distilled_data
from qdistill.distill import (
    KD,
    CrossEntropy,
    Distiller,
    ForwardKL,
    GeneralizedJSD,
    Intermediate,
    ReverseKL,
    TokenCrossEntropy,
    TopKKD,
    distill,
    greedy_agreement,
    perplexity,
    supervised,
)
from qdistill.errors import ConfigError, DataError, FileFormatError, FormatError, QDistillError
from qdistill.formats import (
    BinaryFormat,
    CodebookFormat,
    Format,
    FPFormat,
    IntFormat,
    MinMaxFormat,
    PowerFormat,
    QuantizedTensor,
    TernaryFormat,
    fake_quantize,
    format_from_dict,
    int2,
    int4,
    int8,
)
from qdistill.formats.gguf import GGUFQ4_0, GGUFQ8_0, GGUFTernary
from qdistill.models import hf_hook as _hf_hook
from qdistill.models.hf import bitnet_config, load_classifier
from qdistill.pack import freeze, load, save
from qdistill.pack.gguf_export import export_gguf
from qdistill.pack.onnx_export import export_onnx
from qdistill.quant import LayerRule, QuantConfig, QuantPlan, calibrate, fold_batchnorm, quantize_
from qdistill.quant.gguf_presets import gguf_q4_0, gguf_q8_0, gguf_tq1_0, gguf_tq2_0
from qdistill.quant.mixed_precision import layer_sensitivity, plan_mixed_precision
from qdistill.recipes.bitdistill import BitDistillConfig, bitdistill
from qdistill.train import evaluate, fit

__version__ = "0.1.0"

_hf_hook.install()  # quant_method="qdistill" for transformers' from_pretrained (if installed)


def __getattr__(name: str) -> object:
    """``qd.DistillTrainer`` (the Hugging Face Trainer, qdistill.hf_trainer) imports
    transformers only when it is asked for."""
    if name == "DistillTrainer":
        from qdistill.hf_trainer import DistillTrainer

        return DistillTrainer
    raise AttributeError(f"module 'qdistill' has no attribute {name!r}")


__all__ = [
    "perplexity",
    "greedy_agreement",
    "TopKKD",
    "TokenCrossEntropy",
    "ReverseKL",
    "GeneralizedJSD",
    "Intermediate",
    "ForwardKL",
    "KD",
    "BinaryFormat",
    "BitDistillConfig",
    "CodebookFormat",
    "FPFormat",
    "PowerFormat",
    "TernaryFormat",
    "ConfigError",
    "CrossEntropy",
    "DataError",
    "Distiller",
    "FileFormatError",
    "Format",
    "FormatError",
    "IntFormat",
    "MinMaxFormat",
    "LayerRule",
    "QDistillError",
    "QuantConfig",
    "QuantPlan",
    "QuantizedTensor",
    "bitdistill",
    "bitnet_config",
    "calibrate",
    "distill",
    "distilled_data",
    "evaluate",
    "export_onnx",
    "fake_quantize",
    "fit",
    "fold_batchnorm",
    "format_from_dict",
    "freeze",
    "int2",
    "int4",
    "int8",
    "layer_sensitivity",
    "load",
    "load_classifier",
    "plan_mixed_precision",
    "quantize_",
    "save",
    "supervised",
]
# GGUF / llama.cpp (issue 17): block formats, presets, export
__all__ += ["GGUFQ4_0", "GGUFQ8_0", "GGUFTernary", "export_gguf"]
__all__ += ["gguf_q4_0", "gguf_q8_0", "gguf_tq1_0", "gguf_tq2_0"]
