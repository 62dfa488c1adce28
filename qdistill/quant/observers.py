"""Calibration observers: watch activations, then pick a static range for them.

The observers of the quantization whitepaper (Krishnamoorthi 2018, Sec. 3.4 and 4): min-max,
an exponential moving average of per-batch min-max (what QAT frameworks track), a percentile of
the observed values, and the range whose clipping minimises the mean squared quantization error.
"""

from __future__ import annotations

import torch

from qdistill.errors import ConfigError, QDistillError
from qdistill.formats import IntFormat
from qdistill.formats.calibration import mse_clip_scales, range_scales

Scales = tuple[torch.Tensor, torch.Tensor | None]


class Observer:
    """Tracks the running min and max of everything observed."""

    def __init__(self) -> None:
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().min().float(), x.detach().max().float()
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None or self.hi is None:
            raise QDistillError(
                "an observer saw no data: the layer was never reached during calibration; "
                "check that the calibration batches run through the whole model"
            )
        return self.lo.reshape(1), self.hi.reshape(1)

    def scales(self, fmt: IntFormat) -> Scales:
        return range_scales(fmt, *self._range())


class MinMaxObserver(Observer):
    """The full observed range: never clips, sensitive to outliers."""


class MovingAverageObserver(Observer):
    """Exponential moving average of each batch's min and max (``momentum`` on the old value)."""

    def __init__(self, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().min().float(), x.detach().max().float()
        if self.lo is None:
            self.lo, self.hi = lo, hi
            return
        m = self.momentum
        self.lo = m * self.lo + (1 - m) * lo
        self.hi = m * self.hi + (1 - m) * hi


class _SampleObserver(Observer):
    """Keeps a bounded random sample of the observed values (besides the exact min and max)."""

    def __init__(self, max_samples: int = 1 << 18, seed: int = 0) -> None:
        super().__init__()
        self.max_samples = max_samples
        self.samples: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(seed)

    def observe(self, x: torch.Tensor) -> None:
        super().observe(x)
        flat = x.detach().float().reshape(-1)
        per_batch = max(1, self.max_samples // 16)
        if flat.numel() > per_batch:
            idx = torch.randint(0, flat.numel(), (per_batch,), generator=self.generator)
            flat = flat[idx]
        self.samples.append(flat)
        total = sum(s.numel() for s in self.samples)
        if total > self.max_samples:  # thin out uniformly
            merged = torch.cat(self.samples)
            keep = torch.randperm(merged.numel(), generator=self.generator)[: self.max_samples]
            self.samples = [merged[keep]]

    def sample(self) -> torch.Tensor:
        self._range()
        return torch.cat(self.samples)


class PercentileObserver(_SampleObserver):
    """Range from the ``percentile`` and ``100 - percentile`` quantiles of the values seen."""

    def __init__(self, percentile: float = 99.99, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 50.0 < percentile <= 100.0:
            raise ConfigError(f"percentile={percentile} must be in (50, 100]")
        self.percentile = percentile

    def scales(self, fmt: IntFormat) -> Scales:
        s = self.sample()
        q = torch.tensor([1 - self.percentile / 100, self.percentile / 100])
        lo, hi = torch.quantile(s, q)
        return range_scales(fmt, lo.reshape(1), hi.reshape(1))


class MSEObserver(_SampleObserver):
    """The clipped range that minimises the quantization MSE over the observed values."""

    def scales(self, fmt: IntFormat) -> Scales:
        lo, hi = self._range()
        values = torch.cat([self.sample(), lo, hi])  # the extremes take part in the search
        return mse_clip_scales(IntFormat(fmt.bits, symmetric=fmt.symmetric), values)


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "ema": MovingAverageObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
}


def make_observer(name: str) -> Observer:
    """An observer by name (``minmax``, ``ema``, ``percentile``, ``mse``)."""
    if name not in OBSERVERS:
        raise ConfigError(f"unknown observer {name!r}; choose one of {sorted(OBSERVERS)}")
    return OBSERVERS[name]()
