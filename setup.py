"""Build the optional C kernels (csrc/qkernels.c); all metadata lives in pyproject.toml.

The extension is optional: where no C compiler is available the install still succeeds and
qdistill falls back to its portable torch code path with a one-time warning. In CI (``CI`` set)
it is required: a build error fails the install instead of leaving a suite that tests no kernel
(tests/test_kernel_inputs.py also fails when the kernels did not load on x86-64 with a compiler).
"""

import os

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "qdistill._qkernels",
            sources=["csrc/qkernels.c"],
            extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off"],
            extra_link_args=["-fopenmp"],
            optional=not os.environ.get("CI"),
        ),
        # the per-call entry of prepared packed layers (issue #15 item 4): a METH_FASTCALL
        # function instead of ctypes' argument conversion; it needs Python's headers and is
        # optional as the kernels are (without it kernels.py makes the same call via ctypes)
        Extension(
            "qdistill._qdcall",
            sources=["csrc/qdcall.c"],
            extra_compile_args=["-O2"],
            optional=not os.environ.get("CI"),
        ),
    ]
)
