"""qd.export_gguf: a Llama student as a GGUF file, read back with the gguf package's own reader
and dequantizers (independent of qdistill) and compared with qdistill's weights bit for bit."""

import numpy as np
import pytest
import torch

import qdistill as qd
from qdistill.cli import main
from qdistill.errors import QDistillError
from qdistill.pack.gguf_export import layer_qtensor, permute_rows
from qdistill.pack.gguf_tokenizer import CONTROL, NORMAL, UNUSED

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")
from tiny_transformers import bert_config, llama_config  # noqa: E402

VOCAB = 264  # 256 byte tokens + 4 merges + 2 specials + 2 ids the tokenizer lacks
PRESETS = {
    "Q8_0": qd.gguf_q8_0,
    "Q4_0": qd.gguf_q4_0,
    "TQ2_0": qd.gguf_tq2_0,
    "TQ1_0": qd.gguf_tq1_0,
}
LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def tiny_llama(**overrides) -> torch.nn.Module:
    """Width 256 (TQ blocks fit the rows), 4 query heads sharing 2 key/value heads."""
    torch.manual_seed(0)
    spec = dict(
        hidden_size=256,
        intermediate_size=512,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        rope_theta=50000.0,
        rms_norm_eps=1e-5,
    )
    return transformers.LlamaForCausalLM(llama_config(transformers, **{**spec, **overrides})).eval()


def byte_bpe(wordpiece: bool = False):
    """A tiny byte-level BPE tokenizer (GPT-2 style), built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if wordpiece:
        tok = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    else:
        vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
        merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n")]
        for a, b in merges:
            vocab[a + b] = len(vocab)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>"
    )


def field(reader, key):
    return reader.fields[key].contents()


def same_bits(a, b) -> bool:
    a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def module_for(name: str) -> tuple[str, int | None]:
    """The transformers module of a GGUF tensor name, and the heads its rows are permuted by."""
    if name == "token_embd.weight":
        return "model.embed_tokens", None
    if name == "output_norm.weight":
        return "model.norm", None
    if name == "output.weight":
        return "lm_head", None
    _, i, kind, _ = name.split(".")
    heads = {"attn_q": 4, "attn_k": 2}.get(kind)
    return f"model.layers.{i}.{LAYER[kind]}", heads


def our_weight(model, module_name) -> np.ndarray:
    module = model.get_submodule(module_name)
    q = layer_qtensor(module)
    w = module.weight if q is None else q.fmt.dequantize(q)
    return w.detach().float().numpy()


@pytest.mark.parametrize("kind", list(PRESETS))
def test_exported_tensors_are_qdistills_weights_bit_for_bit(tmp_path, kind):
    model = tiny_llama()
    qd.quantize_(model, PRESETS[kind]())
    out = qd.export_gguf(model, tmp_path / "m.gguf", byte_bpe())
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    names = [t.name for t in reader.tensors]
    assert len(names) == 2 + 9 * 2 + 1 and "output.weight" in names  # untied head
    for t in reader.tensors:
        module_name, heads = module_for(t.name)
        ours = our_weight(model, module_name)
        if heads:  # llama.cpp's Q/K row order (adjacent RoPE pairs)
            ours = permute_rows(ours, heads)
        theirs = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.shape)
        assert same_bits(theirs, ours), t.name
        quantized = layer_qtensor(model.get_submodule(module_name)) is not None
        assert (t.tensor_type.name == kind) == quantized, t.name
    assert out.types["blk.0.attn_q.weight"] == kind
    assert out.types["output.weight"] == "F32" and out.types["token_embd.weight"] == "F32"
    assert out.file_type == f"MOSTLY_{kind}"
    assert field(reader, "general.file_type") == int(gguf.LlamaFileType[f"MOSTLY_{kind}"])


def test_metadata_is_the_llama_config(tmp_path):
    model = tiny_llama(num_hidden_layers=1, tie_word_embeddings=True)
    model.tie_weights()
    qd.export_gguf(model, tmp_path / "m.gguf", byte_bpe(), float_type="f16")
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    expected = {
        "general.architecture": "llama",
        "llama.block_count": 1,
        "llama.context_length": 128,
        "llama.embedding_length": 256,
        "llama.feed_forward_length": 512,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 64,
        "llama.rope.freq_base": 50000.0,
        "llama.vocab_size": VOCAB,
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_F16),
    }
    for key, value in expected.items():
        assert field(r, key) == (pytest.approx(value) if isinstance(value, float) else value), key
    assert field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert "output.weight" not in types  # tied: llama.cpp reads token_embd for the output
    assert types["token_embd.weight"] == "F16" and types["output_norm.weight"] == "F32"


def test_tokenizer_metadata(tmp_path):
    tok = byte_bpe()
    qd.export_gguf(tiny_llama(num_hidden_layers=1), tmp_path / "m.gguf", tok)
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == VOCAB
    assert tokens[tok.convert_tokens_to_ids("Ġthe")] == "Ġthe"
    assert [types[tok.bos_token_id], types[tok.eos_token_id]] == [CONTROL, CONTROL]
    assert types[tok.convert_tokens_to_ids("in")] == NORMAL
    assert tokens[-1] == f"[PAD{VOCAB - 1}]" and types[-1] == UNUSED
    assert field(r, "tokenizer.ggml.merges") == ["Ġ t", "h e", "Ġt he", "i n"]
    assert field(r, "tokenizer.ggml.model") == "gpt2" and field(r, "tokenizer.ggml.pre") == "gpt-2"
    assert field(r, "tokenizer.ggml.bos_token_id") == tok.bos_token_id


def test_qk_permutation_turns_hf_rope_into_llama_cpp_rope():
    """Independent check of the permutation's meaning: transformers rotates (i, i + d/2) pairs,
    llama.cpp's ``llama`` rope rotates (2i, 2i + 1); permuting the rows maps one onto the other."""
    heads, d, pos, theta = 3, 8, 5, 10000.0
    freq = theta ** (-np.arange(0, d, 2) / d) * pos  # [d/2]
    q = np.random.default_rng(0).standard_normal((heads * d, 1))
    hf = q.reshape(heads, d).copy()
    a, b = hf[:, : d // 2].copy(), hf[:, d // 2 :].copy()
    hf[:, : d // 2] = a * np.cos(freq) - b * np.sin(freq)
    hf[:, d // 2 :] = b * np.cos(freq) + a * np.sin(freq)
    p = permute_rows(q, heads).reshape(heads, d)
    x, y = p[:, 0::2].copy(), p[:, 1::2].copy()
    p[:, 0::2] = x * np.cos(freq) - y * np.sin(freq)
    p[:, 1::2] = y * np.cos(freq) + x * np.sin(freq)
    np.testing.assert_allclose(p.reshape(-1, 1), permute_rows(hf.reshape(-1, 1), heads))


def test_packed_file_exports_the_same_tensors(tmp_path):
    model = tiny_llama(num_hidden_layers=1)
    qd.quantize_(model, qd.gguf_q4_0())
    qd.export_gguf(model, tmp_path / "fake.gguf")
    qd.save(model, tmp_path / "m.qd.safetensors")
    byte_bpe().save_pretrained(tmp_path / "tok")
    cmd = ["export-gguf", str(tmp_path / "m.qd.safetensors"), str(tmp_path / "p.gguf")]
    assert main([*cmd, "--tokenizer", str(tmp_path / "tok")]) == 0
    fake, packed = gguf.GGUFReader(tmp_path / "fake.gguf"), gguf.GGUFReader(tmp_path / "p.gguf")
    assert [t.name for t in fake.tensors] == [t.name for t in packed.tensors]
    for a, b in zip(fake.tensors, packed.tensors, strict=True):
        assert a.tensor_type == b.tensor_type and np.array_equal(a.data, b.data), a.name
    assert len(field(packed, "tokenizer.ggml.tokens")) == VOCAB


def test_bad_inputs_name_the_problem_and_leave_no_file(tmp_path):
    out = tmp_path / "m.gguf"
    bert = transformers.BertModel(bert_config(transformers))
    with pytest.raises(QDistillError, match="LlamaForCausalLM"):
        qd.export_gguf(bert, out)
    model = tiny_llama(num_hidden_layers=1)
    qd.quantize_(model, qd.QuantConfig(weights=qd.int4(group_size=32), keep_last=True))
    with pytest.raises(QDistillError, match=r"model\.layers\.0\.self_attn\.q_proj.*gguf_q4_0"):
        qd.export_gguf(model, out)
    with pytest.raises(QDistillError, match="WordPiece"):
        qd.export_gguf(tiny_llama(num_hidden_layers=1), out, byte_bpe(wordpiece=True))
    assert list(tmp_path.iterdir()) == []
    out.write_bytes(b"old")  # an earlier file survives a failed export untouched
    with pytest.raises(QDistillError):
        qd.export_gguf(model, out)
    assert out.read_bytes() == b"old" and list(tmp_path.iterdir()) == [out]


def test_cli_bad_architecture_one_line_exit_2(tmp_path, capsys):
    bert = transformers.BertModel(bert_config(transformers)).eval()
    qd.quantize_(bert, qd.QuantConfig(weights=qd.int8(axis=0)))
    qd.save(bert, tmp_path / "bert.qd.safetensors")
    out = tmp_path / "bert.gguf"
    assert main(["export-gguf", str(tmp_path / "bert.qd.safetensors"), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "LlamaForCausalLM" in err and "BertModel" in err
    assert not out.exists()


def test_quantized_embedding_table_is_exported_in_its_block_type(tmp_path):
    model = tiny_llama(num_hidden_layers=1)
    qd.quantize_(model, qd.gguf_tq2_0(embeddings=qd.GGUFQ8_0()))
    out = qd.export_gguf(model, tmp_path / "m.gguf")
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    t = {t.name: t for t in r.tensors}["token_embd.weight"]
    assert t.tensor_type.name == "Q8_0" and out.types["blk.0.ffn_down.weight"] == "TQ2_0"
    ours = our_weight(model, "model.embed_tokens")
    assert same_bits(gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.shape), ours)
