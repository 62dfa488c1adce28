"""Helpers shared by the kernel tests: the dispatch levels this CPU runs, a packed A8 layer, a
call under an address-space limit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import qdistill as qd
from qdistill.pack import kernels

ROW8 = qd.IntFormat(8, axis="row")
_LIB = kernels.library()
needs_amx = pytest.mark.skipif(
    _LIB is None or not _LIB.qd_has_amx(),
    reason="no AMX here (needs AMX-TILE + AMX-INT8 in CPUID, Linux's tile permission and a "
    "kernels build from GCC >= 11 / clang >= 12)",
)


@pytest.fixture
def amx_allowed(monkeypatch):
    """The AMX tests test AMX: plans they make may use it even where the run was started with
    QDISTILL_NO_AMX=1 (tests that want it off set it themselves)."""
    monkeypatch.delenv(kernels.NO_AMX_ENV, raising=False)


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


_MEMORY_LIMIT_SCRIPT = """
import resource, torch
from torch import nn
import qdistill as qd
torch.set_num_threads(1)
{setup}
vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1])
limit = vm * 1024 + ({headroom_mb} << 20)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
    with torch.no_grad():
        packed(x)
except MemoryError as exc:
    print("MemoryError", exc)
"""


def call_under_memory_limit(tmp_path, setup: str, headroom_mb: int) -> str:
    """Run ``packed(x)`` in a fresh one-thread Python whose address space (RLIMIT_AS, Linux) is
    limited to what it holds after ``setup`` (code defining ``packed`` and ``x``, run in
    ``tmp_path``) plus ``headroom_mb``; returns its stdout, which holds ``MemoryError <message>``
    when the call raised MemoryError. A crash or any other exception fails the calling test."""
    script = _MEMORY_LIMIT_SCRIPT.format(setup=textwrap.dedent(setup), headroom_mb=headroom_mb)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env,
        timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout
