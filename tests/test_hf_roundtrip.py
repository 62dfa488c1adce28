"""Hugging Face round trip: quantize_ -> save_pretrained / qd.save -> from_pretrained / qd.load.

Tiny random Llama, GPT-2 and BERT models saved to tmp folders; the offline MiniLM and SmolLM2
packages when installed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import qdistill as qd
from qdistill.errors import FileFormatError, QDistillError
from qdistill.pack.modules import PackedLinear
from qdistill.quant.modules import QuantLinear

transformers = pytest.importorskip("transformers")
from tiny_transformers import bert_config, llama_config  # noqa: E402

VOCAB = 64
IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
REPO = Path(__file__).resolve().parents[1]


def tiny_llama(tie: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = llama_config(transformers, vocab_size=VOCAB, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = bert_config(transformers, vocab_size=VOCAB, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


INT4 = qd.QuantConfig(weights=qd.int4(group_size=32), unsupported="ignore")
W8A8 = qd.QuantConfig(
    weights=qd.int8(), activations=qd.IntFormat(8, axis="row"), rules={"classifier": None}
)
CASES = {
    "llama": (tiny_llama, transformers.AutoModelForCausalLM, INT4),
    "llama-tied-packed-head": (
        lambda: tiny_llama(tie=True),
        transformers.AutoModelForCausalLM,
        INT4,
    ),
    "llama-tied-float-head": (
        lambda: tiny_llama(tie=True),
        transformers.AutoModelForCausalLM,
        qd.QuantConfig(
            weights=qd.int4(group_size=32), rules={"lm_head": None}, unsupported="ignore"
        ),
    ),
    "gpt2": (tiny_gpt2, transformers.AutoModelForCausalLM, INT4),
    "bert": (tiny_bert, transformers.AutoModelForSequenceClassification, W8A8),
}


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


# ---------------------------------------------------------------------------- GPT-2 Conv1D
def test_gpt2_conv1d_layers_become_quantized_linears_with_the_transposed_weight():
    model = tiny_gpt2()
    conv = model.transformer.h[0].attn.c_attn
    w, b = conv.weight.detach().clone(), conv.bias
    x = torch.randn(3, 32)
    qd.quantize_(model, INT4)
    # every Conv1D (c_attn, c_proj, c_fc, mlp.c_proj) of both blocks, plus lm_head
    conv_names = [f"transformer.h.{i}.{n}" for i in (0, 1)
                  for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]  # fmt: skip
    assert set(conv_names) <= set(model.qd_plan.quantized)
    assert not model.qd_plan.unsupported
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, QuantLinear)
    assert torch.equal(layer.weight.detach(), w.t())
    assert layer.bias is b  # the same parameter object
    fmt = qd.int4(group_size=32)
    expected = x @ fmt.dequantize(fmt.quantize(w.t())).t() + b  # independent reference
    with torch.no_grad():
        assert torch.allclose(layer(x), expected, atol=1e-5)


def test_packed_gpt2_conv1d_runs_on_the_packed_linear_kernel():
    model = qd.quantize_(tiny_gpt2(), INT4)
    expected = logits(model)
    qd.freeze(model)
    layer = model.transformer.h[0].mlp.c_fc
    assert isinstance(layer, PackedLinear) and layer.weight_shape == (128, 32)
    got = logits(model)
    if qd.pack.kernels.library() is not None:
        assert layer._kernel is not None and layer._kernel.kind == "lut"  # int4 C kernel
    assert torch.allclose(got, expected, atol=1e-4)


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("case", list(CASES))
def test_save_pretrained_writes_packed_codes_and_from_pretrained_returns_the_packed_model(
    case, tmp_path
):
    build, auto, cfg = CASES[case]
    model = qd.quantize_(build(), cfg)
    expected = logits(model)
    model.save_pretrained(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "qdistill"
    assert set(qc["layers"]) == set(model.qd_plan.quantized)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        for name in model.qd_plan.quantized:
            assert f"{name}.weight" not in keys  # never the float master weight
            assert f.get_slice(f"{name}.weight_codes").get_dtype() == "U8"
        assert "qdistill" in f.metadata()

    loaded = auto.from_pretrained(tmp_path)
    for name in model.qd_plan.quantized:
        assert isinstance(loaded.get_submodule(name), PackedLinear), name
    assert not any(t.is_meta for t in loaded.state_dict().values())
    assert torch.allclose(logits(loaded), expected, atol=1e-4)

    # and again: save_pretrained of the packed model, from_pretrained of that
    loaded.save_pretrained(tmp_path / "again")
    again = auto.from_pretrained(tmp_path / "again")
    assert torch.equal(logits(again), logits(loaded))


@pytest.mark.parametrize("case", list(CASES))
def test_qd_load_rebuilds_a_transformers_model_without_a_skeleton(case, tmp_path):
    build, _, cfg = CASES[case]
    model = qd.quantize_(build(), cfg)
    expected = logits(model)
    path = qd.save(model, tmp_path / "m.qd.safetensors")
    arch = qd.pack.read_header(path)["architecture"]["transformers"]
    assert arch["class"] == type(model).__name__
    assert "quantization_config" not in arch["config"]

    loaded = qd.load(path)
    assert type(loaded) is type(model)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert torch.allclose(logits(loaded), expected, atol=1e-4)
    if case == "llama-tied-packed-head":  # a packed head is not re-tied to the float table
        assert "lm_head.weight" not in loaded.state_dict()
    if case == "llama-tied-float-head":  # one table under two names is written once
        with safe_open(str(path), framework="pt") as f:
            assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        untied = qd.save(qd.quantize_(tiny_llama(), CASES[case][2]), tmp_path / "u.safetensors")
        with safe_open(str(untied), framework="pt") as f:  # an untied head is its own table
            assert "lm_head.weight" in f.keys()

    # the loaded packed model saves the Hugging Face way too (the silent-random case)
    _, auto, _ = CASES[case]
    loaded.save_pretrained(tmp_path / "hf")
    assert torch.allclose(logits(auto.from_pretrained(tmp_path / "hf")), expected, atol=1e-4)


def test_qd_load_builds_the_skeleton_on_the_meta_device(tmp_path):
    from qdistill.models import hf_arch

    path = qd.save(qd.quantize_(tiny_llama(), INT4), tmp_path / "m.qd.safetensors")
    spec = qd.pack.read_header(path)["architecture"]["transformers"]
    skeleton = hf_arch.build(spec, path)
    assert all(p.is_meta for p in skeleton.parameters())  # no random init, no allocation


def test_hf_classifier_wrapper_round_trips_through_qd_load(tmp_path):
    from qdistill.models.hf import HFClassifier

    model = qd.quantize_(HFClassifier(tiny_bert()), qd.QuantConfig(weights=qd.int8()))
    batch = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}
    with torch.no_grad():
        expected = model(batch)
    loaded = qd.load(qd.save(model, tmp_path / "c.qd.safetensors"))
    assert isinstance(loaded, HFClassifier)
    with torch.no_grad():
        assert torch.allclose(loaded(batch), expected, atol=1e-5)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_generate_on_the_packed_model_gives_the_fake_quant_models_greedy_tokens(build, tmp_path):
    model = qd.quantize_(build(), INT4)
    prompt = IDS[:1, :5]
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    expected = model.generate(prompt, **kwargs)
    model.save_pretrained(tmp_path)
    packed = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(packed.generate(prompt, **kwargs), expected)
    assert expected.shape[1] == 15


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "name", ["NotAModel", "AutoModelForCausalLM", "os.system", "PretrainedConfig"]
)
def test_a_header_naming_a_class_transformers_cannot_build_is_refused(name, tmp_path):
    path = qd.save(qd.quantize_(tiny_llama(), INT4), tmp_path / "m.qd.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    header = json.loads(meta["qdistill"])
    header["architecture"]["transformers"]["class"] = name
    header.pop("header_crc32")  # an edited header without its CRC: the class check is reached
    save_file(load_file(path), str(path), metadata={"qdistill": json.dumps(header)})
    with pytest.raises(FileFormatError, match=rf"model class '{name}'.*qd.load\(path, model="):
        qd.load(path)


def test_subln_model_records_no_architecture_and_asks_for_the_model(tmp_path):
    from qdistill.models.subln import insert_subln

    model = tiny_llama()
    insert_subln(model)
    path = qd.save(qd.quantize_(model, INT4), tmp_path / "m.qd.safetensors")
    with pytest.raises(FileFormatError, match="does not record its architecture"):
        qd.load(path)


def test_a_float_checkpoint_cannot_be_quantized_on_load(tmp_path):
    import qdistill.hf

    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pre-quantized"):
        transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, quantization_config=qdistill.hf.QDistillConfig()
        )


# ---------------------------------------------------------------------------- registration
def _python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def test_import_qdistill_registers_before_transformers_is_imported(tmp_path):
    qd.quantize_(tiny_llama(), INT4).save_pretrained(tmp_path / "packed")
    code = (
        "import sys, qdistill\n"
        "assert 'transformers' not in sys.modules\n"  # import qdistill stays light
        "from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained('packed')\n"
        "print(type(m.model.layers[0].mlp.up_proj).__name__)\n"
    )
    run = _python(code, tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "PackedLinear"


def test_qdistill_imports_and_quantizes_without_transformers(tmp_path):
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import torch, qdistill as qd\n"
        "m = qd.quantize_(torch.nn.Sequential(torch.nn.Linear(4, 4)), qd.QuantConfig(qd.int8()))\n"
        "print(type(m[0]).__name__)\n"
    )
    run = _python(code, tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "QuantLinear"


# ---------------------------------------------------------------------------- offline models
def _offline(name: str) -> tuple[str, dict]:
    from qdistill.models.hf import pretrained_source

    try:
        return pretrained_source(name)
    except qd.QDistillError as exc:
        pytest.skip(str(exc))


def test_offline_minilm_classifier_round_trips(tmp_path):
    _offline("minilm")
    tok = transformers.AutoTokenizer.from_pretrained(_offline("minilm")[0])
    batch = dict(tok(["a packed student", "reloads the hugging face way"], padding=True,
                     return_tensors="pt"))  # fmt: skip
    # MiniLM classifies by mean pooling (its sentence-transformers config): qd.save records it
    model = qd.load_classifier("minilm", 3)
    assert model.pooling == "mean"
    qd.quantize_(model, qd.bitnet_config(model))
    path = qd.save(model, tmp_path / "c.qd.safetensors")
    with torch.no_grad():
        fake_quant = model(batch)
        expected = qd.freeze(model)(batch)  # the packed W1.58A8 kernels, frozen in memory
        loaded = qd.load(path)
        assert loaded.pooling == "mean"
        assert torch.equal(loaded(batch), expected)
    # the int8 kernels round a few activations differently from the fake-quant reference (the
    # fp32 attention in between differs in its last bits with the thread count, and one flipped
    # rounding moves a logit by ~2e-3 here); a wrong kernel is off by far more than 1e-2
    assert torch.allclose(expected, fake_quant, atol=1e-2)
    # the transformers class cannot pool by mean: save_pretrained refuses instead of writing a
    # folder that would reload with [CLS] pooling and a random pooler
    with pytest.raises(QDistillError, match="mean pooling.*qd.save"):
        model.hf.save_pretrained(tmp_path / "refused")
    assert not (tmp_path / "refused" / "model.safetensors").exists()

    # with the transformers class's own pooling the Hugging Face way round-trips exactly
    model = qd.load_classifier("minilm", 3, pooling="model")
    qd.quantize_(model, qd.bitnet_config(model))
    model.hf.save_pretrained(tmp_path / "hf")
    with torch.no_grad():
        expected = qd.freeze(model)(batch)
        loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
        assert torch.equal(loaded(**batch).logits, expected)


def test_offline_smollm2_architecture_round_trips_with_its_tokenizer(tmp_path):
    """SmolLM2-135M's own config (two of its 30 blocks, random weights, so the test stays
    fast) and tokenizer; QDISTILL_FULL_MODELS=1 runs the full pretrained model instead."""
    path, kwargs = _offline("smollm2")
    from qdistill.models.hf import load_tokenizer

    if os.environ.get("QDISTILL_FULL_MODELS") == "1":
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    else:
        config = transformers.AutoConfig.from_pretrained(path, **kwargs)
        config.num_hidden_layers = 2
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).eval()
    tok = load_tokenizer("smollm2")
    prompt = tok("The capital of France is", return_tensors="pt")
    qd.quantize_(model, qd.QuantConfig(weights=qd.int4(group_size=32), rules={"lm_head": None},
                                       unsupported="ignore"))  # fmt: skip
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = model.generate(**prompt, **gen)
    model.save_pretrained(tmp_path)
    packed = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(packed.model.layers[0].self_attn.q_proj, PackedLinear)
    assert torch.equal(packed.generate(**prompt, **gen), expected)


@pytest.mark.parametrize("case", ["llama-tied-float-head", "gpt2", "bert"])
def test_qd_load_reads_the_folder_save_pretrained_wrote(case, tmp_path):
    build, _, cfg = CASES[case]
    model = qd.quantize_(build(), cfg)
    expected = logits(model)
    model.save_pretrained(tmp_path)
    loaded = qd.load(tmp_path)  # the tied lm_head / embedding table is written once
    assert type(loaded) is type(model)
    if case == "llama-tied-float-head":
        with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
            assert "lm_head.weight" not in f.keys()
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied again
    assert torch.allclose(logits(loaded), expected, atol=1e-4)


def test_qd_load_of_a_sharded_folder_names_the_fix(tmp_path):
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(FileFormatError, match="2 shards|1 shards|shards.*from_pretrained"):
        qd.load(tmp_path)


def test_loading_a_packed_folder_in_bfloat16_is_refused_with_the_fix(tmp_path):
    qd.quantize_(tiny_llama(), INT4).save_pretrained(tmp_path)
    with pytest.raises(qd.ConfigError, match="float32"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
