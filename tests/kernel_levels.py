"""The kernel dispatch levels this CPU can run, for tests that compare every SIMD path."""

from __future__ import annotations

from qdistill.pack import kernels


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
