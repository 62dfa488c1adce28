"""Hugging Face transformers in and out (importing this module imports transformers).

``import qdistill`` already registers ``quant_method="qdistill"`` with transformers (lazily, see
:mod:`qdistill.models.hf_hook`); importing this module registers at once and gives the pieces::

    import qdistill as qd
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained("float-model")
    qd.quantize_(model, qd.QuantConfig(weights=qd.int4(group_size=32), rules={"lm_head": None}))
    model.save_pretrained("packed")                          # packed codes + quantization_config
    packed = AutoModelForCausalLM.from_pretrained("packed")  # PackedLinear layers, codes only
    qd.save(model, "m.qd.safetensors"); same = qd.load("m.qd.safetensors")  # no skeleton needed
"""

from qdistill.models.hf_quantizer import QDistillConfig, QDistillHfQuantizer, attach, register

register()

__all__ = ["QDistillConfig", "QDistillHfQuantizer", "attach", "register"]
