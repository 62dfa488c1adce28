"""The C ABI declared once (issue #15 item 5): ``qd_signatures()`` parsed into ctypes types."""

import ctypes
import re
from pathlib import Path

import pytest

from qdistill.pack import kernels
from qdistill.pack.cabi import parse_signatures

P, I64, INT, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


def test_declarations_parse_by_hand():
    text = (
        "int qd_abi_version(void);"
        "int64_t qd_quantize_rows(const float *x, int8_t *xq, float *scale, int32_t *rowsum, "
        "int64_t rows, int64_t K, int64_t K_pad, float eps, int level);"
        "void qd_dequant_rows(const uint8_t *codes, int64_t n_bytes, int bits, int mul, "
        "const float *scale, const uint8_t *zp_arr, int zp_const, int div, const float *zf, "
        "int64_t o0, int64_t o1, int64_t K, int64_t G, float *out);"
        "int64_t qd_a8_run(const qd_a8_plan *p, const float *x, float *y, int64_t B, int level);"
        "int64_t qd_advise_hugepages(void *p, int64_t n);"
    )
    sig = parse_signatures(text)
    assert sig["qd_abi_version"] == (INT, [])
    assert sig["qd_quantize_rows"] == (I64, [P] * 4 + [I64] * 3 + [F32, INT])
    assert sig["qd_dequant_rows"] == (None, [P, I64, INT, INT, P, P, INT, INT, P] + [I64] * 4 + [P])
    assert sig["qd_a8_run"] == (I64, [P] * 3 + [I64, INT])
    assert sig["qd_advise_hugepages"] == (I64, [P, I64])


def test_unknown_types_are_named():
    with pytest.raises(ValueError, match="qd_f.*size_t"):
        parse_signatures("void qd_f(size_t n);")
    with pytest.raises(ValueError, match="cannot read"):
        parse_signatures("not a declaration;")


@pytest.mark.skipif(kernels.library() is None, reason="C kernels not built")
def test_every_entry_python_calls_is_declared_once_in_c():
    """Python reads the signatures from the library (QD_API in csrc/qkernels.c): each qd_*
    function the package calls is among them, with ctypes types set from that declaration."""
    lib = kernels.library()
    sig = parse_signatures(lib.qd_signatures().decode())
    pack = Path(kernels.__file__).parent
    called = set()
    for src in pack.glob("*.py"):
        called |= set(re.findall(r"\.(qd_\w+)\(", src.read_text()))
    called.discard("qd_signatures")  # the bootstrap: returns the declarations themselves
    assert called and called <= set(sig), called - set(sig)
    for name in called:
        restype, argtypes = sig[name]
        assert getattr(lib, name).argtypes == argtypes and getattr(lib, name).restype == restype
    assert sig["qd_a8_run"] == (I64, [P] * 3 + [I64, INT])
    assert lib.qd_abi_version() == kernels.ABI_VERSION
