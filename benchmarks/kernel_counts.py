"""Instructions per call of the fused A8 kernel (``qd_a8_linear``), counted by callgrind (#15).

Wall time on a shared 2-core VM is noise; instruction counts are not. This script compiles a
tiny C driver (no Python, no torch) that ``dlopen``s a kernels build, fills random weights and
inputs and calls ``qd_a8_linear`` (quantize + product + bias) 10 times, runs it under
``valgrind --tool=callgrind --toggle-collect=qd_a8_linear`` and prints the instructions per call
for MiniLM-sized layers (384x384, 1536x384, 384x1536: outputs x inputs) and a 4096x4096 one, at
1, 8 and 40 rows. Several ``--so`` builds give side-by-side columns (e.g. a build of an older
commit: ``git archive <commit> | tar -x -C /tmp/old && (cd /tmp/old && python setup.py
build_ext --inplace)``). Valgrind emulates no AVX-512, so the counts are of the AVX2 paths
(``--level 2``; ``1`` counts the portable C). Needs gcc and valgrind.

    python benchmarks/kernel_counts.py                                   # this build, ternary
    python benchmarks/kernel_counts.py --kind int8 --so /tmp/old/qdistill/_qkernels*.so \\
        qdistill/_qkernels*.so
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import shutil
import subprocess
import tempfile

DRIVER = r"""
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
typedef int64_t (*a8_fn)(int, const void *, const float *, const void *, const int32_t *,
                         const float *, int64_t, int64_t, int64_t, int64_t, float,
                         const float *, float *, int64_t, int);
int main(int argc, char **argv) {
    void *h = dlopen(argv[1], RTLD_NOW);
    if (!h) { fprintf(stderr, "%s\n", dlerror()); return 1; }
    a8_fn f = (a8_fn)dlsym(h, "qd_a8_linear");
    int kind = atoi(argv[2]), level = atoi(argv[8]);
    int64_t B = atol(argv[3]), O = atol(argv[4]), I = atol(argv[5]), Ip = atol(argv[6]);
    int64_t g = atol(argv[7]), n = (O + 64) * (Ip + 64);
    uint8_t *w = malloc(n), *zp = calloc(n, 1);
    float *s = malloc(4 * n), *bias = calloc(O, 4), *x = malloc(4 * B * I), *y = malloc(4 * B * O);
    int32_t *wsum = calloc(O + 64, 4);
    for (int64_t i = 0; i < n; i++) { w[i] = (uint8_t)(rand() & 0x7f); s[i] = 0.01f; }
    for (int64_t i = 0; i < B * I; i++) x[i] = (float)rand() / RAND_MAX - 0.5f;
    int64_t status = 0;
    for (int r = 0; r < 10; r++)
        status |= f(kind, w, s, kind == 2 ? (void *)zp : NULL, wsum, bias, O, I, Ip, g, 0.0f, x, y,
                    B, level);
    return status != 0;
}
"""
KINDS = {"ternary": 0, "int8": 1, "int4": 2}
SHAPES = [(384, 384), (1536, 384), (384, 1536), (4096, 4096)]


def padded(so: str, kind: str, inputs: int) -> int:
    """The input width the build's kernel expects (ABI 4: ternary rows padded to 16, before
    to 256; the others are not padded)."""
    if kind != "ternary":
        return inputs
    lib = ctypes.CDLL(os.path.abspath(so))
    block = 16 if lib.qd_abi_version() >= 4 else 256
    return -(-inputs // block) * block


def count(driver: str, so: str, kind: str, rows: int, out_f: int, in_f: int, level: int) -> int:
    """Instructions of one qd_a8_linear call (mean of 10)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cg.out")
        args = [os.path.abspath(so), KINDS[kind], rows, out_f, in_f, padded(so, kind, in_f)]
        cmd = ["valgrind", "--tool=callgrind", "--toggle-collect=qd_a8_linear"]
        cmd += (
            [f"--callgrind-out-file={out}", driver] + [str(a) for a in args] + ["128", str(level)]
        )
        env = dict(os.environ, OMP_NUM_THREADS="1")
        subprocess.run(
            cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        with open(out) as fh:
            total = sum(int(line.split()[1]) for line in fh if line.startswith("summary:"))
        return total // 10


def main() -> None:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--so", nargs="+", default=sorted(glob.glob(f"{here}/qdistill/_qkernels*.so")))
    p.add_argument("--kind", choices=list(KINDS), default="ternary")
    p.add_argument("--level", type=int, default=2, help="1: portable C, 2: AVX2")
    p.add_argument("--rows", default="1,8,40")
    args = p.parse_args()
    if not (shutil.which("valgrind") and shutil.which("gcc")):
        p.error("needs valgrind and gcc (apt-get install -y valgrind gcc)")
    with tempfile.TemporaryDirectory() as tmp:
        src, driver = os.path.join(tmp, "driver.c"), os.path.join(tmp, "driver")
        with open(src, "w") as fh:
            fh.write(DRIVER)
        # the kernels' own dependencies (libm, OpenMP), which Python loads for them otherwise
        libs = ["-Wl,--no-as-needed", "-lm", "-lgomp", "-ldl"]
        subprocess.run(["gcc", "-O2", "-o", driver, src, *libs], check=True)
        print(f"# {args.kind}, instructions per qd_a8_linear call, level {args.level}")
        names = [f"build{i}" for i in range(len(args.so))]
        for name, so in zip(names, args.so, strict=True):
            print(f"# {name}: {so} (ABI {ctypes.CDLL(os.path.abspath(so)).qd_abi_version()})")
        print(f"{'outputs x inputs':<18}{'rows':>5}" + "".join(f"{n:>12}" for n in names))
        for out_f, in_f in SHAPES:
            for rows in (int(r) for r in args.rows.split(",")):
                if out_f * in_f * rows > 4096 * 4096 * 8:
                    continue  # minutes under valgrind
                counts = [
                    count(driver, so, args.kind, rows, out_f, in_f, args.level) for so in args.so
                ]
                print(f"{f'{out_f}x{in_f}':<18}{rows:>5}" + "".join(f"{c:>12}" for c in counts))


if __name__ == "__main__":
    main()
