/* The read loop of stream_probe.c behind qd_a8_linear's signature, so that kernel_ab.py can time
 * it interleaved with a real build (benchmarks/results/kernels-gemv.md, table 2): it reads the
 * layer's code bytes (int8: O * I, ternary / int2: O_pad * I_pad / 4, int4: O * I / 2, without
 * the int4 scales) and nothing else, 8 streams of 4 KB a block, blocks split statically over
 * the OpenMP threads, prefetch 8 lines ahead; y[0] gets a checksum. Not part of the package:
 *
 *   gcc -O3 -fopenmp -shared -fPIC -o /tmp/loop.so benchmarks/stream_loop_so.c
 *   python benchmarks/kernel_ab.py --so /tmp/loop.so qdistill/_qkernels*.so --kind int8 \
 *       --rows 1 --cold 700 --shapes 4096x4096,1024x4096 --threads 2
 */
#include <immintrin.h>
#include <stdint.h>
int qd_abi_version(void) { return 7; }
__attribute__((target("avx512f,avx512bw,avx512vnni")))
int64_t qd_a8_linear(int kind, const void *w, const float *ws, const void *zp, const int32_t *wsum,
                     const float *bias, int64_t O, int64_t I, int64_t I_pad, int64_t g, float eps,
                     const float *x, float *y, int64_t B, int level) {
    int64_t bytes = kind == 1 ? O * I : kind == 0 ? (O + 15) / 16 * 16 * I_pad / 4 : O * I / 2;
    int64_t nb = bytes / 32768;
    const int8_t *p = (const int8_t *)w;
    int32_t total = 0;
#pragma omp parallel for schedule(static) reduction(+ : total) if (bytes >= (1 << 20))
    for (int64_t u = 0; u < nb; u++) {
        const __m512i ones = _mm512_set1_epi8(1);
        __m512i acc = _mm512_setzero_si512();
        const int8_t *b = p + u * 32768;
        for (int64_t i = 0; i < 4096; i += 64)
            for (int r = 0; r < 8; r++) {
                const int8_t *q = b + r * 4096 + i;
                _mm_prefetch((const char *)(q + 512), _MM_HINT_T0);
                __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(ones), "m"(*(const __m512i *)q));
            }
        total += _mm512_reduce_add_epi32(acc);
    }
    y[0] = (float)total;
    return 0;
}
