"""Latency and memory, measured side by side in one process (``qdistill bench``).

Every variant runs in the same process on the same input, with repetitions interleaved
(variant A, B, C, A, B, C, ...) so that drifting clocks or a busy neighbour hit all variants
alike; the median of the repetitions is reported. Each figure is also shown against its
physical limit: the bytes of weights a forward pass must read divided by the machine's measured
memory bandwidth (a lower bound on latency at batch 1, where the weights stream from DRAM).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from qdistill.formats.storage import storage_of
from qdistill.pack.modules import PackedEmbedding, PackedMixin, use_portable_path


def _release_freed_memory() -> None:
    """Give freed heap pages back to the OS so that RSS differences mean something."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_mb() -> float:
    """Resident set size of this process, in MB (from /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return 0.0


def memory_bandwidth_gbs(megabytes: int = 512, repeats: int = 5) -> float:
    """Read bandwidth (GB/s): the fastest of two ways to stream a buffer far larger than the
    caches, each timed by its median: a sum, and a float matrix-vector product (the fp32
    baseline's own access pattern; a sum alone under-reads some CPUs, and the fp32 model then
    came out faster than its "bound")."""
    n = megabytes * 2**20 // 4
    buf = torch.ones(n)
    mat, vec = buf.view(-1, 4096), torch.ones(4096)
    rates = []
    for fn in (buf.sum, lambda: torch.mv(mat, vec)):
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        rates.append(n * 4 / statistics.median(times) / 1e9)
    del buf
    return max(rates)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights a forward pass reads: the kernel's codes, scales and zero points, the
    file's packed codes and scales on the portable path, or float weights. A module that runs
    elsewhere (an onnxruntime session) states its own ``weight_nbytes``."""
    if hasattr(model, "weight_nbytes"):
        return int(model.weight_nbytes)
    total = 0
    for m in model.modules():
        if isinstance(m, PackedMixin):
            kp = getattr(m, "_kernel", None)
            if kp:  # the kernel reads its (repacked) copy
                total += kp.nbytes()
            else:  # the file's codes, scales and zero points (the storage descriptor's count)
                total += storage_of(m.weight_format).file_nbytes(m.weight_shape)
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            total += m.weight.numel() * m.weight.element_size()
    return total


def interleaved_best_us(
    fns: list[Callable[[], object]],
    rounds: int,
    reps: int,
    order: list[int] | None = None,
) -> list[float]:
    """Microseconds per call of each callable: in every round each one runs ``reps`` times in a
    row (in ``order``, default as given), and the fastest round's mean is kept. The A/B kernel
    benchmarks read ratios of these on a shared machine, where load only ever adds time."""
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for j in order or range(len(fns)):
            fn = fns[j]
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            best[j] = min(best[j], (time.perf_counter() - t0) / reps * 1e6)
    return best


CACHE_MODES = ("warm", "flush", "flush+sleep")


def cache_state_medians(
    fns: list[Callable[[], object]],
    modes: tuple[str, ...] | list[str] = CACHE_MODES,
    reps: int = 15,
    flush_mb: int = 400,
    sleep_s: float = 0.02,
) -> dict[tuple[str, int], float]:
    """Median microseconds of one call of each callable in each cache state, keyed by ``(mode,
    index)``. Before each timed call: ``warm``, the same call once; ``flush``, a torch sum over
    ``flush_mb`` MB (the weights and the Python / torch code's data then come from memory, as
    after a larger model); ``flush+sleep``, the same and ``sleep_s`` asleep (the OpenMP workers
    stop spinning). Repetitions interleave the modes and the callables, so drifts hit all."""
    flush = torch.ones(flush_mb << 18)  # float32: 4 bytes
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(reps):
        for mode in modes:
            for j, fn in enumerate(fns):
                if mode == "warm":
                    fn()
                else:
                    flush.sum()
                    if mode == "flush+sleep":
                        time.sleep(sleep_s)
                t0 = time.perf_counter()
                fn()
                times.setdefault((mode, j), []).append((time.perf_counter() - t0) * 1e6)
    return {key: statistics.median(ts) for key, ts in times.items()}


def interleaved_medians(
    fns: dict[str, Callable[[], object]], reps: int = 30, warmup: int = 3
) -> dict[str, float]:
    """Median seconds of each callable, repetitions interleaved across callables."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def float_twin(model: nn.Module) -> nn.Module:
    """The same architecture in float, with the packed layers' dequantized weights."""
    twin = copy.deepcopy(model)
    for name, m in list(twin.named_modules()):
        if not isinstance(m, PackedMixin):
            continue
        w = m.unpacked_weight()
        if isinstance(m, PackedEmbedding):
            new: nn.Module = nn.Embedding.from_pretrained(w, padding_idx=m.padding_idx)
        elif hasattr(m, "conv"):
            c = m.conv
            new = nn.Conv2d(
                w.shape[1] * c["groups"],
                w.shape[0],
                w.shape[2:],
                stride=c["stride"],
                padding=c["padding"],
                dilation=c["dilation"],
                groups=c["groups"],
                bias=m.bias is not None,
            )
        else:
            new = nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None)
        with torch.no_grad():
            new.weight.copy_(w)
            if m.bias is not None:
                new.bias.copy_(m.bias)
        parent, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, child, new)
    return twin.eval()


def bench(
    variants: dict[str, Callable[[], nn.Module]],
    input_shape: tuple[int, ...],
    batches: tuple[int, ...] = (1, 32),
    reps: int = 30,
    file_bytes: dict[str, int] | None = None,
    bandwidth: float | None = None,
    model_name: str = "model",
) -> list[dict]:
    """Rows of ``model,variant,batch,latency_ms,speedup_vs_fp32,bytes,peak_rss_mb,
    fraction_of_bound`` for every variant (the first one is the float baseline).

    ``variants`` maps a name to a function that builds (loads) the model, so that the RSS growth
    of each load can be measured; ``peak_rss_mb`` is that growth after a first forward pass.
    """
    bandwidth = bandwidth or memory_bandwidth_gbs()
    models, rss = {}, {}
    for name, build in variants.items():
        _release_freed_memory()
        before = rss_mb()
        model = build().eval()
        with torch.no_grad():
            model(torch.randn(1, *input_shape))  # prepares kernels (repacked weights)
        _release_freed_memory()
        rss[name] = rss_mb() - before
        models[name] = model
    rows = []
    base = next(iter(variants))
    for batch in batches:
        x = torch.randn(batch, *input_shape)
        with torch.no_grad():
            fns = {name: (lambda m=m, x=x: m(x)) for name, m in models.items()}
            med = interleaved_medians(fns, reps=reps)
        for name, model in models.items():
            bound = weight_bytes(model) / (bandwidth * 1e9)
            rows.append(
                {
                    "model": model_name,
                    "variant": name,
                    "batch": batch,
                    "latency_ms": round(med[name] * 1e3, 4),
                    "speedup_vs_fp32": round(med[base] / med[name], 2),
                    "bytes": (file_bytes or {}).get(name, weight_bytes(model)),
                    "peak_rss_mb": round(rss[name], 1),
                    "fraction_of_bound": round(bound / med[name], 3),
                }
            )
    return rows


def _portable(model: nn.Module) -> nn.Module:
    """The same packed model forced onto the portable path (unpack, dequantize, matmul)."""
    return use_portable_path(model)  # Linear kernels, Conv2d tiles, Embedding rows


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``qdistill bench FILE``: a packed file against its float twin, side by side."""
    p = subparsers.add_parser(
        "bench",
        help="latency and memory of a packed file against its float twin",
        description=__doc__.splitlines()[0],
    )
    from qdistill.cli import new_file, positive_int

    p.add_argument("file", help="a packed model written by qd.save")
    p.add_argument(
        "--input-shape", type=input_shape, default=None, help="e.g. 1,28,28 (default: the file's)"
    )
    p.add_argument("--batch", type=positive_int, nargs="+", default=[1, 32])
    p.add_argument("--reps", type=positive_int, default=30, help="interleaved repetitions (median)")
    p.add_argument("--threads", type=positive_int, default=2, help="torch and kernel threads")
    p.add_argument("--portable", action="store_true", help="also time the portable path")
    p.add_argument("--csv", type=new_file, default=None, help="also write the rows to this CSV")
    return p


def input_shape(text: str) -> tuple[int, ...]:
    """``"1,28,28"`` -> ``(1, 28, 28)`` (argparse type: positive integers, comma-separated)."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write sizes like 1,28,28") from None
    if not shape or min(shape) < 1 or len(shape) > 8:
        raise argparse.ArgumentTypeError(f"{text!r}: 1 to 8 sizes, each >= 1")
    return shape


def _input_shape(args: argparse.Namespace) -> tuple[int, ...]:
    from qdistill.errors import ConfigError
    from qdistill.pack import read_header

    if args.input_shape:
        shape = args.input_shape
        return shape if isinstance(shape, tuple) else input_shape(str(shape))
    header = read_header(args.file)
    kw = (header.get("architecture") or {}).get("kwargs", {})
    if "input_size" in kw or "in_channels" in kw:
        size = kw.get("input_size", 28)
        return (kw.get("in_channels", 1), size, size)
    layers = header.get("layers", {})
    first = next(iter(layers.values()), None)
    if first is not None and "conv" not in first and len(first["shape"]) == 2:
        return (int(first["shape"][1]),)  # a model that starts with a Linear
    raise ConfigError("the file does not record its input shape; pass --input-shape")


def cmd_bench(args: argparse.Namespace) -> int:
    """Run ``qdistill bench``: print a markdown table (and write a CSV with ``--csv``)."""
    from qdistill.pack import load
    from qdistill.pack.kernels import cpu_path
    from qdistill.report import markdown_table, write_csv

    torch.set_num_threads(int(getattr(args, "threads", 2) or 2))
    shape = _input_shape(args)
    bandwidth = memory_bandwidth_gbs()
    variants: dict[str, Callable[[], nn.Module]] = {
        "fp32": lambda: float_twin(_portable(load(args.file))),
        "packed": lambda: load(args.file),
    }
    if getattr(args, "portable", False):
        variants["packed-portable"] = lambda: _portable(load(args.file))
    size = os.path.getsize(args.file)
    rows = bench(
        variants,
        shape,
        batches=tuple(args.batch),
        reps=args.reps,
        bandwidth=bandwidth,
        file_bytes={"packed": size, "packed-portable": size},
        model_name=os.path.basename(args.file),
    )
    print(
        f"measured read bandwidth {bandwidth:.1f} GB/s; {torch.get_num_threads()} threads; "
        f"kernels: {cpu_path()}"
    )
    print(markdown_table(rows))
    if getattr(args, "csv", None):
        write_csv(rows, args.csv)
    return 0
