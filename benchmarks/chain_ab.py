"""A/B of the fused run of packed Linears (qdistill.pack.chain, #15) on runtime.py's 151 MB model.

The linear-heavy model of runtime.py (Linear 4096x4096, ReLU, Linear 4096x4096, ReLU, Linear
4096->1024) is quantized, saved and loaded back as a user would (``qd.load``: its Sequential
becomes a ``PackedSequential``), then three callables run on the same packed layers (the same
weight memory), alternating in every repetition:

* ``unfused``: a plain ``nn.Sequential`` holding the same children: each packed Linear's own
  prepared C call, ``torch.empty`` per layer, the ReLUs as torch ops (the path before #15's
  chain);
* ``fused``: the loaded model itself: one ``qd_chain_run`` call for the three layers and the
  two ReLUs;
* ``kernels``: the three layers' C entries alone (``qd_a8_run`` / ``qd_wo_run`` through
  ``qdistill._qdcall``, preallocated outputs, no ReLU, no module code): what the C work costs;
* with ``--fp32``, ``fp32``: the float model (eager ``nn.Linear``), in the same cycle, and
  ``fp32/fused``, the speed-up #15's targets are stated in.

Before each timed call: ``warm`` (the same call once), ``flush`` (a torch sum over 400 MB: the
weights and the Python/torch code's data come from memory) or ``flush+sleep`` (the same, then
20 ms asleep: the OpenMP worker sleeps too). Medians in us. On a machine shared with other work
run it under ``chrt -f 50`` (both cores for the seconds it takes), as
benchmarks/results/kernels-chain.md does:

    chrt -f 50 python benchmarks/chain_ab.py --variants int8,int4 --batch 1,32 --threads 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from gemv_model_ab import packed_model  # noqa: E402
from runtime import linear_heavy  # noqa: E402

from qdistill.pack.chain import PackedSequential  # noqa: E402
from qdistill.report.runtime import CACHE_MODES, cache_state_medians  # noqa: E402

MODES = CACHE_MODES
COLUMNS = ("unfused", "fused", "kernels")


def callables(model: nn.Module, x: torch.Tensor) -> list:
    """unfused, fused and kernels-alone calls of ``model`` on ``x`` (plans bound, outputs
    checked equal)."""
    assert type(model) is PackedSequential
    plain = nn.Sequential(*model)  # the same children: the unfused module path
    with torch.no_grad():
        plain(x)  # binds the plans
        a, b = plain(x), model(x)
    assert torch.equal(a, b), "fused and unfused differ"
    layers = [m for m in model if getattr(m, "_kernel", None)]
    calls = [m._kernel._call for m in layers]
    xs = [x] + [torch.randn(x.shape[0], m.weight_shape[1]) for m in layers[1:]]
    ys = [torch.empty(x.shape[0], m.weight_shape[0]) for m in layers]
    rows = x.shape[0]

    def kernels() -> None:
        for c, xi, y in zip(calls, xs, ys, strict=True):
            c[0](c[1], c[2], xi.data_ptr(), y.data_ptr(), rows, 0)

    return [lambda: plain(x), lambda: model(x), kernels]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="int8,int4,ternary,int2,int8-wo,int4-wo")
    p.add_argument("--batch", default="1,32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--fp32", action="store_true", help="also time the float model")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {args.threads} threads, median of {args.reps} interleaved repetitions (us)")
    fp32 = linear_heavy().eval() if args.fp32 else None
    extra = f"{'fp32':>9}{'fp32/fused':>11}" if fp32 is not None else ""
    print(f"{'variant':<9}{'batch':>6} {'mode':<13}" + "".join(f"{c:>9}" for c in COLUMNS)
          + f"{'unf/fused':>10}{'fused-kern':>11}" + extra)  # fmt: skip
    for variant in args.variants.split(","):
        model = packed_model(variant)
        for batch in (int(b) for b in args.batch.split(",")):
            x = torch.randn(batch, 4096)
            fns = callables(model, x)
            if fp32 is not None:
                fns.append(lambda fp32=fp32, x=x: fp32(x))
            with torch.no_grad():
                med = cache_state_medians(fns, MODES, args.reps)
            for mode in MODES:
                un, fu, ke, *fl = (med[(mode, j)] for j in range(len(fns)))
                tail = f"{fl[0]:>9.0f}{fl[0] / fu:>11.2f}" if fl else ""
                print(
                    f"{variant:<9}{batch:>6} {mode:<13}{un:>9.0f}{fu:>9.0f}{ke:>9.0f}"
                    f"{un / fu:>10.2f}{fu - ke:>11.0f}{tail}",
                    flush=True,
                )
        del model


if __name__ == "__main__":
    main()
