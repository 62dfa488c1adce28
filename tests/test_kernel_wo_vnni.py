"""4-bit weight-only codes x fp32 inputs on AVX-512 VNNI (issue #15), against float64.

At one batch row, ``qd_lut_gemm`` with 4-bit codes writes the input row as 23-bit integers
times one scale (three exact byte digits, error <= 2^-23.98 of the row's largest input per
input) and sums ``s * (c - zp) * q`` lane by lane with ``vpdpbusd`` (csrc/qkernels.c,
``lut4_vnni_impl``): every lane sum and zero-point correction is exact in int32, the group scale
is applied in an fp32 FMA. So its distance to the float64 product on the dequantized weight is
the split's (at most sum_i |w_i| max|x| 2^-23.98) plus that of fp32 sums, which PyTorch's own
fp32 ``F.linear`` on the same weight measures (and within the 1e-5 contract of
tests/test_kernels.py on every SIMD level). The weights here are random codes in the file's
"lsb" layout (input 2j in the low nibble of byte j, 2j + 1 in the high one), called through
ctypes: the reference ``(c - zp) * s`` is built independently of qdistill's dequantizer.
"""

import pytest
import torch
import torch.nn.functional as F

from qdistill.pack import kernels

LIB = kernels.library()
needs_kernels = pytest.mark.skipif(LIB is None, reason="C kernels not built")
LEVELS = (0, 1, 2)  # the best the CPU has (VNNI here), portable C, at most AVX2
OUT = 37  # not a multiple of the 4-row tiles
# inputs, group size: partial last 128-input chunk with 1 (160), 3 (224) or 1 of 2 (320)
# groups; whole chunks (384, 4096); a row-wide group off the chunks (4000); g = 128 and 256
LAYOUTS = [(160, 32), (224, 32), (320, 64), (384, 64), (4096, 64), (4096, 128), (768, 256),
           (4000, 4000)]  # fmt: skip


def lsb_pack(codes: torch.Tensor) -> torch.Tensor:
    """[O, I] codes 0..15 -> the "lsb" byte stream (two codes a byte, the first in bits 0-3)."""
    c = codes.to(torch.uint8).reshape(-1, 2)
    return (c[:, 0] | (c[:, 1] << 4)).contiguous()


def make_weight(in_f: int, g: int, zp_mode: str, seed: int, out_f: int = OUT) -> dict:
    """Random codes, scales and zero points (``zp_mode``: "sym" = none, every zero point 8;
    "zp" = 0..15; "big" = 0..255, outside the code range; "mixed": the first half 0..15, the
    rest 0..255) and the float64 dequantized weight."""
    gen = torch.Generator().manual_seed(seed)
    groups = in_f // g
    codes = torch.randint(0, 16, (out_f, in_f), generator=gen)
    s = torch.rand(out_f * groups, generator=gen) * 0.02 + 1e-3
    high = {"sym": 1, "zp": 16, "big": 256, "mixed": 256}[zp_mode]
    zp = torch.randint(0, high, (out_f * groups,), generator=gen).to(torch.uint8)
    if zp_mode == "mixed":
        zp[: zp.numel() // 2] %= 16
    zp_used = torch.full_like(zp, 8) if zp_mode == "sym" else zp
    per_input = lambda t: t.reshape(out_f, groups).double().repeat_interleave(g, 1)  # noqa: E731
    w = (codes.double() - per_input(zp_used)) * per_input(s)
    return {"w": lsb_pack(codes), "s": s.float(), "zp": None if zp_mode == "sym" else zp,
            "g": g, "in_f": in_f, "out_f": out_f, "ref_w": w}  # fmt: skip


def run(t: dict, x: torch.Tensor, level: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    rows, out_f = x.shape[0], t["out_f"]
    y = torch.full((rows, out_f), float("nan"))
    zp = t["zp"]
    status = LIB.qd_lut_gemm(
        t["w"].data_ptr(), t["s"].data_ptr(), None if zp is None else zp.data_ptr(), 8, 4,
        x.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(), rows, out_f,
        t["in_f"], t["g"], level,
    )  # fmt: skip
    assert status == 0
    return y


def err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).abs().max())


def within_split_bound(y: torch.Tensor, ref: torch.Tensor, w: torch.Tensor, x, fp32: float):
    """Per output: |y - ref| <= sum_i |w_i| max|x| 2^-23.98 (the split of the row into 23-bit
    integers, a hard bound) + 4x fp32 F.linear's own largest distance (the fp32 sums)."""
    split = w.abs().sum(1) * x.abs().max(dim=1, keepdim=True).values.double() * 2**-23.98
    return bool(((y.double() - ref).abs() <= split + 4 * fp32 + 1e-7).all())


@needs_kernels
@pytest.mark.parametrize("in_f,g", LAYOUTS, ids=str)
@pytest.mark.parametrize("zp_mode", ["sym", "zp"])
def test_int4_rows_groups_and_zero_points(in_f, g, zp_mode):
    """1, 2, 3 and 7 rows on every level within the contract (1e-5 of the largest output); one
    row on the best level (the VNNI path where the CPU has it) within the split's bound plus 4x
    PyTorch fp32 F.linear's distance to float64 (measured: at most 2.0x fp32's distance in 48
    rows, the AVX2 float path 1.9x; a wrong code, digit or group scale moves it by ~1e-2 of
    the output)."""
    t = make_weight(in_f, g, zp_mode, seed=in_f + g)
    for rows in (1, 2, 3, 7):
        x = torch.randn(rows, in_f) * 2
        ref = x.double() @ t["ref_w"].t()
        fp32 = err(F.linear(x, t["ref_w"].float()), ref)
        for level in LEVELS:
            e = err(run(t, x, level), ref)
            assert e <= 1e-5 * float(ref.abs().max()) + 1e-6, (rows, level, e)
            if rows == 1 and level == 0:
                assert within_split_bound(run(t, x, 0), ref, t["ref_w"], x, fp32), (e, fp32)


@needs_kernels
def test_int4_one_row_wide_range_zero_row_and_bias():
    """Inputs over 8 decades (the split's step is 2^-23 of the largest input, an absolute error
    on every input: here it outweighs the fp32 sums, ~6x fp32 F.linear's distance to float64,
    still ~1e-6 of the largest output), an all-zero row (scale 0: y is the bias exactly) and the
    bias added once."""
    t = make_weight(4096, 64, "zp", seed=1)
    bias = torch.randn(OUT)
    x = torch.randn(1, 4096, generator=torch.Generator().manual_seed(1))
    x *= torch.logspace(-6, 2, 4096)
    ref = x.double() @ t["ref_w"].t() + bias.double()
    fp32 = err(F.linear(x, t["ref_w"].float(), bias), ref)
    assert within_split_bound(run(t, x, 0, bias), ref, t["ref_w"], x, fp32)
    for level in LEVELS:
        assert err(run(t, x, level, bias), ref) <= 1e-5 * float(ref.abs().max()) + 1e-6
        assert torch.equal(run(t, torch.zeros(1, 4096), level, bias), bias[None])


@needs_kernels
def test_int4_zero_points_outside_the_codes_take_the_float_path():
    """Zero points up to 255 (a file may hold them): |c - zp| no longer keeps the lane sums in
    int32, so those tiles take the float lookup; the result stays within the contract."""
    t = make_weight(384, 64, "big", seed=3)
    x = torch.randn(1, 384)
    ref = x.double() @ t["ref_w"].t()
    for level in LEVELS:
        assert err(run(t, x, level), ref) <= 1e-5 * float(ref.abs().max()) + 1e-6


@needs_kernels
def test_int4_one_row_nan_and_inf():
    """A NaN input makes the whole row NaN; one +inf gives +-inf (NaN where the weight is 0)
    exactly as float64 does: such rows take the float path, not the integer split."""
    t = make_weight(384, 32, "zp", seed=4)
    x = torch.randn(1, 384)
    nan, inf = x.clone(), x.clone()
    nan[0, 11] = float("nan")
    inf[0, 11] = float("inf")
    ref = inf.double() @ t["ref_w"].t()
    for level in LEVELS:
        assert torch.isnan(run(t, nan, level)).all()
        y = run(t, inf, level)
        assert torch.equal(torch.isnan(y), torch.isnan(ref))
        assert torch.equal(y[~torch.isnan(y)].double(), ref[~torch.isnan(ref)])


@needs_kernels
def test_int4_one_row_split_across_threads():
    """A layer large enough for the OpenMP split of the tiles (over 1 << 20 weights: two threads
    where OpenMP has them), half of it with zero points above 15 (float lookup) and half exact,
    261 rows (a 1-row remainder tile): every output row right on every level."""
    t = make_weight(4096, 64, "mixed", seed=5, out_f=261)
    x = torch.randn(1, 4096)
    ref = x.double() @ t["ref_w"].t()
    for level in LEVELS:
        assert err(run(t, x, level), ref) <= 1e-5 * float(ref.abs().max()) + 1e-6
