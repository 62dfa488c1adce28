"""A packed Linear computed from dequantized tiles: the Linear twin of the Conv2d tiles.

For weights whose storage no integer kernel takes but the C row reader does (affine codes with
a float zero point per bucket: Polino et al. 2018's min-max quantizer, Sec. 2.1, stored as
``beta + alpha * c / (2**bits - 1)``), each call dequantizes at most
:data:`~qdistill.pack.conv.TILE_WEIGHTS` weights at a time with ``qd_dequant_rows`` (bit-exact
with the format's ``dequantize``) and multiplies them with ``F.linear``; the layer keeps only
its packed codes resident, never the float weight. A weight of one tile computes exactly what
the fake-quant layer computes (the same float weight, the same ``F.linear``).

The entry is chosen from the storage descriptor alone (:mod:`qdistill.pack.registry`), so any
format that describes its storage this way takes it with no code of its own. Integer-zero
storages that no integer kernel takes (3, 5-7 bits...) keep the portable path as before: giving
them this path too is a one-line change to :func:`_float_zero_rows`, left for a measured
comparison.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from qdistill.formats.storage import Storage
from qdistill.pack import conv, kernels, registry
from qdistill.pack.dequant import DequantPlan, dequantize_rows, storage_plan
from qdistill.pack.inputs import on_cpu


@dataclass
class TilePlan(kernels.KernelPlan):
    """A :class:`~qdistill.pack.kernels.KernelPlan` whose weight is read one tile of output
    rows at a time (``weight`` is the file's packed codes, kept as they are)."""

    rows: DequantPlan | None = None
    tiles: list[tuple[int, int, int]] = field(default_factory=list)

    def nbytes(self) -> int:
        """Bytes of codes, scales and float zero points read on every call."""
        zf = self.rows.zero_float if self.rows is not None else None
        return super().nbytes() + (0 if zf is None else zf.numel() * 4)


def _float_zero_rows(st: Storage, site: registry.Site) -> bool:
    return registry.row_readable(st, site) and st.zero == "float"


def _prepare(layer: Any, st: Storage, site: registry.Site) -> TilePlan | None:
    dp = storage_plan(st, site.shape, layer.weight_scale, layer.weight_zero_point)
    if dp is None or not on_cpu(layer.weight_codes, layer.bias):
        return None
    out_f, in_f = site.shape[0], site.row_len
    tiles = conv.conv_tiles(out_f, 1, in_f, conv.TILE_WEIGHTS)
    return TilePlan(
        "tiles", layer.weight_codes, dp.scale, in_f, in_f, bits=st.bits, rows=dp, tiles=tiles
    )


def _run(
    layer: Any, kp: TilePlan, x: torch.Tensor, bias: Any, rows: int, level: int
) -> torch.Tensor:
    """``F.linear`` of the (quantized) input with each dequantized tile of the weight."""
    x = layer.quantized_input(x)
    outs = []
    for o0, o1, _ in kp.tiles:
        w = dequantize_rows(layer.weight_codes, kp.rows, o0, o1)
        outs.append(F.linear(x, w, None if bias is None else bias[o0:o1]))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


registry.register(registry.Kernel("tiles", ("linear",), None, _float_zero_rows, _prepare, _run))
