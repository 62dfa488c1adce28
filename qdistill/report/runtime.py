"""Latency and memory, measured side by side in one process (``qdistill bench``).

Every variant runs in the same process on the same input, with repetitions interleaved
(variant A, B, C, A, B, C, ...) so that drifting clocks or a busy neighbour hit all variants
alike; the median of the repetitions is reported. Each figure is also shown against its
physical limit: the bytes of weights a forward pass must read divided by the machine's measured
memory bandwidth (a lower bound on latency at batch 1, where the weights stream from DRAM).
"""

from __future__ import annotations

import copy
import gc
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from qdistill.pack.modules import PackedMixin


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
    """Read bandwidth (GB/s): the median time to sum a buffer far larger than the caches."""
    buf = torch.ones(megabytes * 2**20 // 4)
    buf.sum()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t)
    del buf
    return megabytes * 2**20 / statistics.median(times) / 1e9


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights a forward pass reads: packed codes and scales, or float weights."""
    total = 0
    for m in model.modules():
        if isinstance(m, PackedMixin):
            kp = getattr(m, "_kernel", None)
            if kp:  # the kernel reads its repacked copy
                total += kp.weight.numel() * kp.weight.element_size()
                total += kp.weight_scale.numel() * 4
            else:
                total += m.weight_codes.numel() + m.weight_scale.numel() * 4
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            total += m.weight.numel() * m.weight.element_size()
    return total


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
        if hasattr(m, "conv"):
            c = m.conv
            new: nn.Module = nn.Conv2d(
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
