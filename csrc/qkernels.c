/*
 * qdistill CPU kernels: low-bit weight x int8 activation matrix products, computed on the
 * packed codes (the float weight matrix is never materialised).
 *
 *   ternary_gemm: weights in {-1, 0, +1} stored as 2-bit codes c = w + 1 in the "block256"
 *                 layout (per row, blocks of 256 weights in 64 bytes: byte b of block k holds
 *                 the codes of weights k*256 + b + 64*j in bits 2j..2j+1, j = 0..3), int8
 *                 activations. sum_i w_i x_i = sum_i c_i x_i - sum_i x_i.
 *   int8_gemm:    int8 weights, int8 activations.
 *   int4_gemm:    4-bit codes with a scale and zero point per group of G weights (G a multiple
 *                 of 64), int8 activations (W4A8, as llama.cpp's Q4 x Q8 dot products); layout
 *                 per row in chunks of 64 codes (32 bytes: byte j = code j | code j+32 << 4).
 *                 Writes float outputs: sum_g s_g * (sum_i c_i x_i - zp_g * sum_i x_i) * x_scale.
 *
 * Both write int32 dot products y[b*O + o]; the caller applies the scales. The fastest path the
 * CPU has is chosen at run time: AVX-512 VNNI (_mm512_dpbusd_epi32, u8 x s8 -> s32 in one
 * instruction), AVX2 (_mm256_maddubs_epi16 + _mm256_madd_epi16, as in llama.cpp's and BitNet's
 * CPU kernels), or portable C. Rows are split across threads with OpenMP.
 */
#include <stdint.h>
#include <math.h>
#include <string.h>
#ifdef __x86_64__
#include <immintrin.h>
#endif

static int32_t ternary_row_c(const uint8_t *w, const int8_t *x, int64_t n_blocks) {
    int32_t acc = 0;
    for (int64_t k = 0; k < n_blocks; k++) {
        const uint8_t *wb = w + 64 * k;
        const int8_t *xb = x + 256 * k;
        for (int j = 0; j < 4; j++)
            for (int b = 0; b < 64; b++)
                acc += (int32_t)((wb[b] >> (2 * j)) & 3) * xb[64 * j + b];
    }
    return acc;
}

static int32_t int8_row_c(const int8_t *w, const int8_t *x, int64_t n) {
    int32_t acc = 0;
    for (int64_t i = 0; i < n; i++) acc += (int32_t)w[i] * x[i];
    return acc;
}

#ifdef __x86_64__
__attribute__((target("avx2"))) static inline int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

__attribute__((target("avx2"))) static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
    return _mm_cvtss_f32(s);
}

/* Up to NB batch rows share every weight load: the codes are unpacked once per chunk. */
#define NB 4

__attribute__((target("avx2"))) static void ternary_rows_avx2(const uint8_t *w, const int8_t **x,
                                                               int64_t n_blocks, int32_t *out, int nb) {
    const __m256i mask = _mm256_set1_epi8(3);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[NB];
    for (int b = 0; b < nb; b++) acc[b] = _mm256_setzero_si256();
    for (int64_t h = 0; h < 2 * n_blocks; h++) { /* half h: 32 bytes of block h/2 */
        int64_t k = h >> 1, off = 32 * (h & 1);
        __m256i v = _mm256_loadu_si256((const __m256i *)(w + 32 * h));
        __m256i c0 = _mm256_and_si256(v, mask);
        __m256i c1 = _mm256_and_si256(_mm256_srli_epi16(v, 2), mask);
        __m256i c2 = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
        __m256i c3 = _mm256_and_si256(_mm256_srli_epi16(v, 6), mask);
        for (int b = 0; b < nb; b++) {
            const int8_t *xb = x[b] + 256 * k + off;
            __m256i p0 = _mm256_maddubs_epi16(c0, _mm256_loadu_si256((const __m256i *)(xb)));
            __m256i p1 = _mm256_maddubs_epi16(c1, _mm256_loadu_si256((const __m256i *)(xb + 64)));
            __m256i p2 = _mm256_maddubs_epi16(c2, _mm256_loadu_si256((const __m256i *)(xb + 128)));
            __m256i p3 = _mm256_maddubs_epi16(c3, _mm256_loadu_si256((const __m256i *)(xb + 192)));
            /* each i16 lane is at most 2*2*128 = 512 in magnitude: four of them fit easily */
            __m256i s = _mm256_add_epi16(_mm256_add_epi16(p0, p1), _mm256_add_epi16(p2, p3));
            acc[b] = _mm256_add_epi32(acc[b], _mm256_madd_epi16(s, ones));
        }
    }
    for (int b = 0; b < nb; b++) out[b] = hsum_epi32(acc[b]);
}

#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni")))

VNNI_TARGET static void ternary_rows_vnni(const uint8_t *w, const int8_t **x, int64_t n_blocks,
                                          int32_t *out, int nb) {
    const __m512i mask = _mm512_set1_epi8(3);
    __m512i acc[NB];
    for (int b = 0; b < nb; b++) acc[b] = _mm512_setzero_si512();
    for (int64_t k = 0; k < n_blocks; k++) {
        __m512i v = _mm512_loadu_si512((const void *)(w + 64 * k));
        __m512i c0 = _mm512_and_si512(v, mask);
        __m512i c1 = _mm512_and_si512(_mm512_srli_epi16(v, 2), mask);
        __m512i c2 = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
        __m512i c3 = _mm512_and_si512(_mm512_srli_epi16(v, 6), mask);
        for (int b = 0; b < nb; b++) {
            const int8_t *xb = x[b] + 256 * k;
            __m512i a = acc[b];
            a = _mm512_dpbusd_epi32(a, c0, _mm512_loadu_si512((const void *)(xb)));
            a = _mm512_dpbusd_epi32(a, c1, _mm512_loadu_si512((const void *)(xb + 64)));
            a = _mm512_dpbusd_epi32(a, c2, _mm512_loadu_si512((const void *)(xb + 128)));
            acc[b] = _mm512_dpbusd_epi32(a, c3, _mm512_loadu_si512((const void *)(xb + 192)));
        }
    }
    for (int b = 0; b < nb; b++) out[b] = _mm512_reduce_add_epi32(acc[b]);
}

/* int8 x int8 with VNNI: dpbusd wants u8 x s8, so x is shifted to u8 (x ^ 0x80 = x + 128)
 * and 128 * sum_i w_i (wsum, precomputed per row) is subtracted afterwards. */
VNNI_TARGET static void int8_rows_vnni(const int8_t *w, const int8_t **x, int64_t n, int32_t wsum,
                                       int32_t *out, int nb) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512i acc[NB];
    for (int b = 0; b < nb; b++) acc[b] = _mm512_setzero_si512();
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        __m512i wv = _mm512_loadu_si512((const void *)(w + i));
        for (int b = 0; b < nb; b++) {
            __m512i xu = _mm512_xor_si512(_mm512_loadu_si512((const void *)(x[b] + i)), flip);
            acc[b] = _mm512_dpbusd_epi32(acc[b], xu, wv);
        }
    }
    for (int b = 0; b < nb; b++) {
        int32_t total = _mm512_reduce_add_epi32(acc[b]);
        for (int64_t j = i; j < n; j++) total += (int32_t)w[j] * (x[b][j] + 128);
        out[b] = total - 128 * wsum;
    }
}

__attribute__((target("avx2"))) static void int8_rows_avx2(const int8_t *w, const int8_t **x,
                                                            int64_t n, int32_t *out, int nb) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[NB];
    for (int b = 0; b < nb; b++) acc[b] = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i wv = _mm256_loadu_si256((const __m256i *)(w + i));
        __m256i wa = _mm256_sign_epi8(wv, wv); /* |w|: maddubs multiplies unsigned x signed */
        for (int b = 0; b < nb; b++) {
            __m256i xv = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(x[b] + i)), wv);
            acc[b] = _mm256_add_epi32(acc[b], _mm256_madd_epi16(_mm256_maddubs_epi16(wa, xv), ones));
        }
    }
    for (int b = 0; b < nb; b++) {
        int32_t total = hsum_epi32(acc[b]);
        for (int64_t j = i; j < n; j++) total += (int32_t)w[j] * x[b][j];
        out[b] = total;
    }
}

__attribute__((target("avx2,fma"))) static void int4_rows_avx2(
    const uint8_t *w, const int8_t **x, const float *s, const int32_t *zp, const int32_t **xgsum,
    int64_t n_groups, int64_t chunks_per_group, float *out, int nb) {
    const __m256i mask = _mm256_set1_epi8(15);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[NB];
    float corr[NB];
    for (int b = 0; b < nb; b++) { acc[b] = _mm256_setzero_ps(); corr[b] = 0.0f; }
    for (int64_t g = 0; g < n_groups; g++) {
        __m256i dot[NB];
        for (int b = 0; b < nb; b++) dot[b] = _mm256_setzero_si256();
        for (int64_t k = 0; k < chunks_per_group; k++) {
            int64_t c = g * chunks_per_group + k;
            __m256i v = _mm256_loadu_si256((const __m256i *)(w + 32 * c));
            __m256i lo = _mm256_and_si256(v, mask);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
            for (int b = 0; b < nb; b++) {
                const int8_t *xc = x[b] + 64 * c;
                __m256i p = _mm256_add_epi16(
                    _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)xc)),
                    _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(xc + 32))));
                dot[b] = _mm256_add_epi32(dot[b], _mm256_madd_epi16(p, ones));
            }
        }
        __m256 sg = _mm256_set1_ps(s[g]);
        for (int b = 0; b < nb; b++) {
            acc[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[b]), sg, acc[b]);
            corr[b] += s[g] * (float)(zp[g] * xgsum[b][g]);
        }
    }
    for (int b = 0; b < nb; b++) out[b] = hsum_ps(acc[b]) - corr[b];
}

VNNI_TARGET static void int4_rows_vnni(const uint8_t *w, const int8_t **x, const float *s,
                                       const int32_t *zp, const int32_t **xgsum, int64_t n_groups,
                                       int64_t chunks_per_group, float *out, int nb) {
    const __m256i mask = _mm256_set1_epi8(15);
    __m512 acc[NB];
    float corr[NB];
    for (int b = 0; b < nb; b++) { acc[b] = _mm512_setzero_ps(); corr[b] = 0.0f; }
    for (int64_t g = 0; g < n_groups; g++) {
        __m512i dot[NB];
        for (int b = 0; b < nb; b++) dot[b] = _mm512_setzero_si512();
        for (int64_t k = 0; k < chunks_per_group; k++) {
            int64_t c = g * chunks_per_group + k;
            __m256i v = _mm256_loadu_si256((const __m256i *)(w + 32 * c));
            __m512i codes = _mm512_inserti64x4(
                _mm512_castsi256_si512(_mm256_and_si256(v, mask)),
                _mm256_and_si256(_mm256_srli_epi16(v, 4), mask), 1);
            for (int b = 0; b < nb; b++)
                dot[b] = _mm512_dpbusd_epi32(dot[b], codes,
                                             _mm512_loadu_si512((const void *)(x[b] + 64 * c)));
        }
        __m512 sg = _mm512_set1_ps(s[g]);
        for (int b = 0; b < nb; b++) {
            acc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[b]), sg, acc[b]);
            corr[b] += s[g] * (float)(zp[g] * xgsum[b][g]);
        }
    }
    for (int b = 0; b < nb; b++) out[b] = _mm512_reduce_add_ps(acc[b]) - corr[b];
}
#endif

static float int4_row_c(const uint8_t *w, const int8_t *x, const float *s, const int32_t *zp,
                        const int32_t *xgsum, int64_t n_groups, int64_t chunks_per_group) {
    float acc = 0.0f;
    for (int64_t g = 0; g < n_groups; g++) {
        int32_t dot = 0;
        for (int64_t k = 0; k < chunks_per_group; k++) {
            const uint8_t *wc = w + 32 * (g * chunks_per_group + k);
            const int8_t *xc = x + 64 * (g * chunks_per_group + k);
            for (int j = 0; j < 32; j++)
                dot += (int32_t)(wc[j] & 15) * xc[j] + (int32_t)(wc[j] >> 4) * xc[32 + j];
        }
        acc += s[g] * (float)(dot - zp[g] * xgsum[g]);
    }
    return acc;
}


static int has_avx2(void) {
#ifdef __x86_64__
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") ? 1 : 0;
    }
    return cached;
#else
    return 0;
#endif
}

static int has_vnni(void) {
#ifdef __x86_64__
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") ? 1 : 0;
    }
    return cached;
#else
    return 0;
#endif
}

int qd_has_avx2(void) { return has_avx2(); }
int qd_has_vnni(void) { return has_vnni(); }

/* level: 0 = the best the CPU has, 1 = portable C, 2 = at most AVX2 */
static int pick(int level) {
    if (level == 1) return 0;
    if (level == 0 && has_vnni()) return 2;
    return has_avx2() ? 1 : 0;
}

/* Per-row symmetric int8 quantization, rounding exactly like IntFormat(8, axis="row"):
 * scale = max(|x|) / 127 (at least 1e-12), q = nearbyint(x * (1 / scale)) clamped to +-127;
 * rows are zero-padded to I_pad; rowsum gets sum_i q_i. */
void qd_quantize_rows(const float *x, int8_t *xq, float *scale, int32_t *rowsum, int64_t rows,
                      int64_t I, int64_t I_pad) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * I;
        int8_t *qr = xq + r * I_pad;
        float amax = 0.0f;
        for (int64_t i = 0; i < I; i++) {
            float a = xr[i] < 0 ? -xr[i] : xr[i];
            if (a > amax) amax = a;
        }
        float s = amax / 127.0f;
        if (s < 1e-12f) s = 1e-12f;
        float inv = 1.0f / s;
        int32_t sum = 0;
        for (int64_t i = 0; i < I; i++) {
            float q = nearbyintf(xr[i] * inv);
            q = q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q);
            qr[i] = (int8_t)q;
            sum += (int32_t)q;
        }
        memset(qr + I, 0, (size_t)(I_pad - I));
        scale[r] = s;
        rowsum[r] = sum;
    }
}

/* The three products. Rows of the output are split over threads; inside a thread, NB batch
 * rows share each weight load. All three apply the scales and the bias and write float. */
static inline float epilogue(int32_t dot, float xs, float ws, const float *bias, int64_t o) {
    return (float)dot * xs * ws + (bias ? bias[o] : 0.0f);
}

/* y[b, o] = (sum_i c[o, i] x[b, i] - rowsum[b]) * x_scale[b] * w_scale[o] + bias[o] */
void qd_ternary_gemm(const uint8_t *w, const int8_t *x, const int32_t *rowsum,
                     const float *x_scale, const float *w_scale, const float *bias, float *y,
                     int64_t B, int64_t O, int64_t I_pad, int level) {
    int64_t n_blocks = I_pad / 256, row_bytes = I_pad / 4;
    int path = pick(level);
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < O; o++) {
        const uint8_t *wr = w + o * row_bytes;
        for (int64_t b0 = 0; b0 < B; b0 += 4) {
            int nb = B - b0 < 4 ? (int)(B - b0) : 4;
#ifdef __x86_64__
            if (path) {
                const int8_t *xs[4];
                int32_t out[4];
                for (int b = 0; b < 4; b++) xs[b] = x + (b0 + (b < nb ? b : 0)) * I_pad;
                if (path == 2)
                    ternary_rows_vnni(wr, xs, n_blocks, out, nb);
                else
                    ternary_rows_avx2(wr, xs, n_blocks, out, nb);
                for (int b = 0; b < nb; b++) {
                    int64_t r = b0 + b;
                    y[r * O + o] = epilogue(out[b] - rowsum[r], x_scale[r], w_scale[o], bias, o);
                }
                continue;
            }
#endif
            for (int b = 0; b < nb; b++) {
                int64_t r = b0 + b;
                int32_t dot = ternary_row_c(wr, x + r * I_pad, n_blocks) - rowsum[r];
                y[r * O + o] = epilogue(dot, x_scale[r], w_scale[o], bias, o);
            }
        }
    }
}

/* y[b, o] = (sum_i w[o, i] x[b, i]) * x_scale[b] * w_scale[o] + bias[o] */
void qd_int8_gemm(const int8_t *w, const int8_t *x, const int32_t *wsum, const float *x_scale,
                  const float *w_scale, const float *bias, float *y, int64_t B, int64_t O,
                  int64_t I, int level) {
    int path = pick(level);
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < O; o++) {
        const int8_t *wr = w + o * I;
        for (int64_t b0 = 0; b0 < B; b0 += 4) {
            int nb = B - b0 < 4 ? (int)(B - b0) : 4;
#ifdef __x86_64__
            if (path) {
                const int8_t *xs[4];
                int32_t out[4];
                for (int b = 0; b < 4; b++) xs[b] = x + (b0 + (b < nb ? b : 0)) * I;
                if (path == 2)
                    int8_rows_vnni(wr, xs, I, wsum[o], out, nb);
                else
                    int8_rows_avx2(wr, xs, I, out, nb);
                for (int b = 0; b < nb; b++)
                    y[(b0 + b) * O + o] = epilogue(out[b], x_scale[b0 + b], w_scale[o], bias, o);
                continue;
            }
#endif
            for (int b = 0; b < nb; b++) {
                int64_t r = b0 + b;
                y[r * O + o] = epilogue(int8_row_c(wr, x + r * I, I), x_scale[r], w_scale[o], bias, o);
            }
        }
    }
}

/* y[b*O + o] = x_scale[b] * sum_g s[o, g] * (sum_{i in g} c[o, i] x[b, i] - zp[o, g] * xgsum[b, g]) */
void qd_int4_gemm(const uint8_t *w, const int8_t *x, const float *s, const int32_t *zp,
                  const int32_t *xgsum, const float *x_scale, const float *bias, float *y,
                  int64_t B, int64_t O, int64_t I, int64_t G, int level) {
    int64_t n_groups = I / G, cpg = G / 64, row_bytes = I / 2;
    int path = pick(level);
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < O; o++) {
        const uint8_t *wr = w + o * row_bytes;
        const float *so = s + o * n_groups;
        const int32_t *zo = zp + o * n_groups;
        for (int64_t b0 = 0; b0 < B; b0 += 4) {
            int nb = B - b0 < 4 ? (int)(B - b0) : 4;
#ifdef __x86_64__
            if (path) {
                const int8_t *xs[4];
                const int32_t *gs[4];
                float out[4];
                for (int b = 0; b < 4; b++) {
                    int64_t r = b0 + (b < nb ? b : 0);
                    xs[b] = x + r * I;
                    gs[b] = xgsum + r * n_groups;
                }
                if (path == 2)
                    int4_rows_vnni(wr, xs, so, zo, gs, n_groups, cpg, out, nb);
                else
                    int4_rows_avx2(wr, xs, so, zo, gs, n_groups, cpg, out, nb);
                for (int b = 0; b < nb; b++)
                    y[(b0 + b) * O + o] = out[b] * x_scale[b0 + b] + (bias ? bias[o] : 0.0f);
                continue;
            }
#endif
            for (int b = 0; b < nb; b++) {
                int64_t r = b0 + b;
                y[r * O + o] = int4_row_c(wr, x + r * I, so, zo, xgsum + r * n_groups, n_groups,
                                          cpg) * x_scale[r] + (bias ? bias[o] : 0.0f);
            }
        }
    }
}
