"""Calibration: fix the scales of a quantized model from a few batches of data (PTQ).

Follows the post-training recipe of the quantization whitepaper (Krishnamoorthi 2018, Sec. 3):
run representative batches through the model, record each quantized layer's input with an
observer, then freeze a static range per layer; optionally choose weight ranges by MSE-optimal
clipping instead of min-max.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from qdistill.errors import QDistillError
from qdistill.formats import IntFormat
from qdistill.formats.calibration import mse_clip_scales
from qdistill.quant.modules import QuantMixin, is_quantized
from qdistill.quant.observers import make_observer


def static_activation_layers(model: nn.Module) -> list[tuple[str, Any]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if is_quantized(m) and isinstance(m.act_format, IntFormat) and m.act_format.axis != "row"
    ]


def _inputs(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def as_batches(data: Iterable | torch.Tensor | None, batch_size: int = 64) -> Iterable | None:
    """Accept a loader, a list of batches, or one tensor of inputs (e.g. distilled data)."""
    if isinstance(data, torch.Tensor):
        return list(data.split(batch_size))
    return data


def calibrate_weights_mse(model: nn.Module) -> list[str]:
    """Fix every integer-quantized weight's scale at its MSE-optimal clipping (per block)."""
    done = []
    for name, m in model.named_modules():
        if is_quantized(m) and isinstance(m.weight_format, IntFormat) and not m.lsq:
            m.weight_step, m.weight_zp = mse_clip_scales(m.weight_format, m.weight.detach())
            done.append(name)
    return done


def calibrate(
    model: nn.Module,
    data: Iterable | None,
    observer: str = "minmax",
    num_batches: int | None = 16,
    weights: str = "minmax",
    progress: bool = True,
) -> nn.Module:
    """Observe ``num_batches`` batches of ``data`` and freeze static activation ranges.

    ``weights="mse"`` also fixes symmetric integer weight scales at their MSE-optimal clipping.
    Layers with per-row (dynamic) activation formats need no calibration and are left alone.
    """
    if weights not in ("minmax", "mse"):
        raise QDistillError(f"weights={weights!r}; use 'minmax' or 'mse'")
    if weights == "mse":
        calibrate_weights_mse(model)
    layers = static_activation_layers(model)
    if not layers:
        return model
    data = as_batches(data)
    if data is None:
        raise QDistillError(
            "calibration needs data: pass a DataLoader of representative inputs (a few batches "
            "are enough), or distilled data for data-free calibration"
        )
    for _, m in layers:
        m.act_observer = make_observer(observer)
        m.act_scale = None
        m.act_zero_point = None
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with torch.no_grad():
            for batch in tqdm(
                data,
                desc=f"calibrate ({observer})",
                disable=not progress,
                total=num_batches,
                leave=False,
            ):
                model(_inputs(batch))
                seen += 1
                if num_batches is not None and seen >= num_batches:
                    break
        if seen == 0:
            raise QDistillError("calibration data is empty: the loader yielded no batch")
        for _, m in layers:
            scale, zp = m.act_observer.scales(m.act_format)
            if m.lsq:
                m.act_scale = nn.Parameter(scale.clone())
            else:
                m.act_scale = scale
            m.act_zero_point = zp
    finally:
        for _, m in layers:
            m.act_observer = None
        model.train(was_training)
    return model


def calibrated(module: QuantMixin) -> bool:
    """True once a layer with static activation quantization has its range."""
    return module.act_format is None or module.act_scale is not None


def needs_calibration(model: nn.Module) -> bool:
    """True when some layer quantizes its input with a static range that is not set yet."""
    return any(m.act_scale is None for _, m in static_activation_layers(model))
