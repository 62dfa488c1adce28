"""Instructions per call of the weight-only kernels, counted by callgrind (#15).

The weight-only counterpart of ``benchmarks/kernel_counts.py`` (which counts the fused A8
call): a tiny C driver (no Python, no torch) ``dlopen``s a kernels build, fills random int8 or
4-bit codes (a scale per group of 64, symmetric: no zero points) and float inputs and calls
``qd_int8w_gemm`` or ``qd_lut_gemm`` 10 times under ``valgrind --tool=callgrind
--toggle-collect=<kernel>``; it prints the instructions per call for MiniLM-sized layers and a
4096x4096 one. Several ``--so`` builds give side-by-side columns. Valgrind emulates no AVX-512,
so the counts are of the AVX2 paths (``--level 2``; ``1`` counts the portable C). Instruction
counts are not time (an FMA-dense loop runs more instructions per cycle than a convert-heavy
one), but unlike wall time on a shared 2-core VM they do not move with the load. Needs gcc and
valgrind.

    python benchmarks/wo_counts.py --kind int8w --so /tmp/wo-old/_qkernels*.so \\
        qdistill/_qkernels*.so
"""

from __future__ import annotations

import argparse
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
typedef void (*i8w_fn)(const int8_t *, const float *, const float *, const float *, float *,
                       int64_t, int64_t, int64_t, int);
typedef int (*lut_fn)(const uint8_t *, const float *, const uint8_t *, int, int, const float *,
                      const float *, float *, int64_t, int64_t, int64_t, int64_t, int);
int main(int argc, char **argv) {
    void *h = dlopen(argv[1], RTLD_NOW);
    if (!h) { fprintf(stderr, "%s\n", dlerror()); return 1; }
    int kind = atoi(argv[2]), level = atoi(argv[6]);
    int64_t B = atol(argv[3]), O = atol(argv[4]), I = atol(argv[5]);
    int8_t *w = malloc(O * I);
    float *s = malloc(4 * O * I), *x = malloc(4 * B * I), *y = malloc(4 * B * O);
    float *bias = calloc(O, 4);
    for (int64_t i = 0; i < O * I; i++) { w[i] = (int8_t)(rand() & 0x7f); s[i] = 0.01f; }
    for (int64_t i = 0; i < B * I; i++) x[i] = (float)rand() / RAND_MAX - 0.5f;
    int status = 0;
    for (int r = 0; r < 10; r++) {
        if (kind == 0)
            ((i8w_fn)dlsym(h, "qd_int8w_gemm"))(w, s, x, bias, y, B, O, I, level);
        else
            status |= ((lut_fn)dlsym(h, "qd_lut_gemm"))((const uint8_t *)w, s, NULL, 8, 4, x,
                                                        bias, y, B, O, I, 64, level);
    }
    return status != 0;
}
"""
KINDS = {"int8w": ("0", "qd_int8w_gemm"), "lut": ("1", "qd_lut_gemm")}
SHAPES = [(384, 384), (1536, 384), (384, 1536), (4096, 4096)]  # outputs x inputs


def count(driver: str, so: str, kind: str, rows: int, out_f: int, in_f: int, level: int) -> int:
    """Instructions of one kernel call (mean of 10)."""
    code, symbol = KINDS[kind]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cg.out")
        cmd = ["valgrind", "--tool=callgrind", f"--toggle-collect={symbol}"]
        cmd += [f"--callgrind-out-file={out}", driver, os.path.abspath(so), code]
        cmd += [str(rows), str(out_f), str(in_f), str(level)]
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
    p.add_argument("--kind", choices=list(KINDS), default="int8w")
    p.add_argument("--level", type=int, default=2, help="1: portable C, 2: AVX2")
    p.add_argument("--rows", default="1,2,4,8,32")
    p.add_argument("--shapes", default="", help="e.g. 384x384,1536x384 (outputs x inputs)")
    args = p.parse_args()
    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if not (shutil.which("valgrind") and shutil.which("gcc")):
        p.error("needs valgrind and gcc (apt-get install -y valgrind gcc)")
    with tempfile.TemporaryDirectory() as tmp:
        src, driver = os.path.join(tmp, "driver.c"), os.path.join(tmp, "driver")
        with open(src, "w") as fh:
            fh.write(DRIVER)
        libs = ["-Wl,--no-as-needed", "-lm", "-lgomp", "-ldl"]
        subprocess.run(["gcc", "-O2", "-o", driver, src, *libs], check=True)
        name = args.kind + (" (4-bit, groups of 64, symmetric)" if args.kind == "lut" else "")
        print(f"# {name}, instructions per call, level {args.level}")
        names = [f"build{i}" for i in range(len(args.so))]
        for n, so in zip(names, args.so, strict=True):
            print(f"# {n}: {so}")
        print(f"{'outputs x inputs':<18}{'rows':>5}" + "".join(f"{n:>12}" for n in names))
        for out_f, in_f in shapes:
            for rows in (int(r) for r in args.rows.split(",")):
                if out_f * in_f * rows > 4096 * 4096 * 8:
                    continue  # minutes under valgrind
                counts = [
                    count(driver, so, args.kind, rows, out_f, in_f, args.level) for so in args.so
                ]
                print(f"{f'{out_f}x{in_f}':<18}{rows:>5}" + "".join(f"{c:>12}" for c in counts))


if __name__ == "__main__":
    main()
