"""Helpers shared by the kernel tests: the dispatch levels this CPU runs, a packed A8 layer."""

from __future__ import annotations

import torch
from torch import nn

import qdistill as qd
from qdistill.pack import kernels

ROW8 = qd.IntFormat(8, axis="row")


def levels() -> list[int]:
    """Dispatch levels of ``qd_a8_run`` and friends that run here: 1 (portable C) everywhere,
    2 (AVX2) and 0 (the best: AVX-512 VNNI) where the CPU has them."""
    lib = kernels.library()
    out = [1]  # portable C everywhere
    if lib is not None and lib.qd_has_avx2():
        out.append(2)
    if lib is not None and lib.qd_has_vnni():
        out.append(0)
    return out


def packed_pair(tmp_path, wfmt, in_f: int, out_f: int, seed: int) -> tuple[nn.Module, nn.Module]:
    """A one-Linear fake-quant model (``wfmt`` weights, per-token int8 inputs) seeded with
    ``seed``, and its packed twin saved to and loaded back from ``tmp_path``."""
    torch.manual_seed(seed)
    fq = nn.Sequential(nn.Linear(in_f, out_f))
    qd.quantize_(fq, qd.QuantConfig(weights=wfmt, activations=ROW8))
    fq.eval()
    path = qd.save(fq, tmp_path / "m.qd.safetensors")
    return fq, qd.load(path, model=nn.Sequential(nn.Linear(in_f, out_f)))
