/*
 * qdistill CPU kernels: low-bit weight matrix products computed on the packed codes (the float
 * weight matrix is never materialised). Plain C, no torch headers; called through ctypes.
 *
 * Integer activations (per-token int8 codes q, scale sx, as IntFormat(8, axis="row")):
 *   qd_ternary_gemm: 2-bit codes c (ternary c = w + 1, or IntFormat(2) with offset/zero point zp
 *                    per row) in the "tile16x16" layout (16 output rows x 16 inputs in 64 bytes,
 *                    rows in the lanes; see its section), register-blocked GEMV / GEMM.
 *                    sum_i (c_i - zp) q_i = sum_i c_i q_i - zp * sum_i q_i.
 *   qd_int8_gemm:    int8 weights (code - 128), row layout (torch._int_mm reads the same tensor);
 *                    register-blocked (VNNI: 8 rows at batch 1, 6 x 4 batch rows; AVX2: 4, 2 x 4).
 *   qd_int4_gemm:    4-bit codes with a scale and zero point per group of g weights (g a multiple
 *                    of 8) in the "tile16" layout: 16 output rows interleaved so that one 64-byte
 *                    vector holds, for each of the 16 rows, 8 consecutive codes (byte 4r + j =
 *                    code[r, 8k + j] | code[r, 8k + 4 + j] << 4). One VNNI instruction then
 *                    multiplies 4 codes of 16 rows by 4 broadcast activations, and the 16 output
 *                    rows live in the 16 lanes: no horizontal sums, and the group scales are
 *                    applied as vectors (the "interleaved rows" layout of oneDNN / FBGEMM GEMV
 *                    kernels, after llama.cpp's Q4 x Q8 arithmetic: s_g * (sum c q - zp * sum q)).
 * Float activations (weight-only, "W4A16"-style; the activations stay fp32):
 *   qd_lut_gemm:     2- or 4-bit codes in the file's own "lsb" layout; each group's 16 possible
 *                    weight values (c - zp) * s go in one AVX-512 register and
 *                    _mm512_permutexvar_ps looks the codes up (the table-lookup dequantization
 *                    of T-MAC, Wei et al. 2024, used here on fp32), then FMA with the activations;
 *                    with AVX2, two 8-entry _mm256_permutevar8x32_ps lookups and a blend.
 *   qd_int8w_gemm:   int8 weights, per-row scale, float activations (AVX-512 or AVX2).
 *
 * The fastest path the CPU has is chosen at run time: AVX-512 VNNI (_mm512_dpbusd_epi32,
 * u8 x s8 -> s32), AVX2 (_mm256_maddubs_epi16 + _mm256_madd_epi16, as in llama.cpp's and BitNet's
 * CPU kernels), or portable C. Output rows are split across threads with OpenMP (the torch wheel
 * ships libgomp.so.1 with the same soname, so the two share one thread pool).
 */
#include <stdint.h>
#include <float.h>
#include <math.h>
#include <string.h>
#include <stdlib.h>
#ifdef __x86_64__
#include <immintrin.h>
#endif
#ifdef __linux__
#include <sys/mman.h>
#endif

/* Batch rows a pass that share every weight load (NB4: the VNNI W4A8 tile). */
#define NB 4
#define NB4 8

static inline int32_t load_i32(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
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


#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni")))
#endif

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

#ifdef __x86_64__
static int has_avx512(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") ? 1 : 0;
    }
    return cached;
}
#endif

/* Ask for transparent huge pages on the 2 MB-aligned part of [p, p + n) (#15 item 1: a 4096 x
 * 4096 ternary weight is 4 MB, 1024 pages of 4 KB that each cost a TLB miss as the kernel streams
 * them). A hint: call it before the memory is first written, so that the first touch can fault
 * in huge pages (THP "madvise" mode). Returns the bytes advised: 0 where the OS has no such hint,
 * refuses it, or the range holds no whole huge page. */
int64_t qd_advise_hugepages(void *p, int64_t n) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)1 << 21;
    uintptr_t a = ((uintptr_t)p + huge - 1) & ~(huge - 1);
    uintptr_t e = ((uintptr_t)p + (uintptr_t)(n > 0 ? n : 0)) & ~(huge - 1);
    if (e <= a) return 0;
    return madvise((void *)a, e - a, MADV_HUGEPAGE) == 0 ? (int64_t)(e - a) : 0;
#else
    (void)p;
    (void)n;
    return 0;
#endif
}

int qd_has_avx2(void) { return has_avx2(); }
int qd_has_vnni(void) { return has_vnni(); }
/* The ABI of this file (kernels.ABI_VERSION): 7 = the entry points' signatures are read from
 * qd_signatures() (QD_API, at the end of this file); 6 = qd_dequant_rows / qd_dequant_gather
 * take a divisor and float zero points (affine storage with a float zero point per bucket);
 * 5 = qd_a8_plan ends with amx_w (AMX W8A8); 4 = qd_ternary_gemm reads the tile16x16 layout
 * (I_pad a multiple of 16, rows padded to 16; kind 0 of qd_a8_linear likewise); 3 = quantize_rows takes a level (dispatch like the
 * gemms), qd_a8_linear / qd_a8_run exist (one call per layer: quantize + product + bias); 2 =
 * quantize_rows takes eps and returns its count of non-finite rows, int4 / lut gemms return -1
 * when an allocation fails. */
int qd_abi_version(void) { return 7; }

/* level: 0 = the best the CPU has, 1 = portable C, 2 = at most AVX2 */
static int pick(int level) {
    if (level == 1) return 0;
    if (level == 0 && has_vnni()) return 2;
    return has_avx2() ? 1 : 0;
}

/* Per-row symmetric int8 quantization, rounding exactly like IntFormat(8, axis="row", eps):
 * scale = max(max(|x|), eps) / 127 (at least 1e-12), q = nearbyint(x * (1 / scale)) clamped
 * to +-127 (eps: 0 for IntFormat's default, 1e-5 for the BitNet b1.58 reference);
 * rows are zero-padded to I_pad; rowsum gets sum_i q_i.
 * A row holding NaN or +-Inf has no int8 codes (casting NaN to int8 is undefined behaviour):
 * its codes and rowsum are 0 and its scale NaN, so every product that uses it is NaN, and the
 * number of such rows is returned (the caller raises, as IntFormat does; see kernels.py). The
 * check rides on the max pass that is needed anyway: !(|x| <= FLT_MAX) is true for NaN and Inf.
 * Vectorized (#15 item 3): the round-to-nearest-even instructions (_mm256_round_ps /
 * _mm512_roundscale_ps with _MM_FROUND_TO_NEAREST_INT) round exactly as nearbyintf does in the
 * default rounding mode, and x * inv is the same single fp32 multiply, so all three variants
 * give the same codes bit for bit. */
static inline float row_scale(float amax, float eps) {
    if (amax < eps) amax = eps;
    float s = amax / 127.0f;
    return s < 1e-12f ? 1e-12f : s;
}

static inline void bad_row(int8_t *qr, float *scale, int32_t *rowsum, int64_t I_pad) {
    memset(qr, 0, (size_t)I_pad);
    *scale = NAN;
    *rowsum = 0;
}

static int quantize_row_c(const float *xr, int8_t *qr, float *scale, int32_t *rowsum, int64_t I,
                          int64_t I_pad, float eps) {
    float amax = 0.0f;
    int bad = 0;
    for (int64_t i = 0; i < I; i++) {
        float a = fabsf(xr[i]);
        bad |= !(a <= FLT_MAX);
        amax = a > amax ? a : amax;
    }
    if (bad) {
        bad_row(qr, scale, rowsum, I_pad);
        return 1;
    }
    float s = row_scale(amax, eps), inv = 1.0f / s;
    int32_t sum = 0;
    for (int64_t i = 0; i < I; i++) {
        float q = nearbyintf(xr[i] * inv);
        q = q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q);
        qr[i] = (int8_t)q;
        sum += (int32_t)q;
    }
    memset(qr + I, 0, (size_t)(I_pad - I));
    *scale = s;
    *rowsum = sum;
    return 0;
}

#ifdef __x86_64__
__attribute__((target("avx2"))) static int quantize_row_avx2(const float *xr, int8_t *qr,
                                                             float *scale, int32_t *rowsum,
                                                             int64_t I, int64_t I_pad, float eps) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 big = _mm256_set1_ps(FLT_MAX);
    __m256 vmax = _mm256_setzero_ps(), vbad = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= I; i += 8) {
        __m256 a = _mm256_and_ps(_mm256_loadu_ps(xr + i), absmask);
        vbad = _mm256_or_ps(vbad, _mm256_cmp_ps(a, big, _CMP_NLE_UQ)); /* NaN, Inf */
        vmax = _mm256_max_ps(vmax, a);
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 0x55));
    float amax = _mm_cvtss_f32(m);
    int bad = _mm256_movemask_ps(vbad) != 0;
    for (; i < I; i++) {
        float a = fabsf(xr[i]);
        bad |= !(a <= FLT_MAX);
        amax = a > amax ? a : amax;
    }
    if (bad) {
        bad_row(qr, scale, rowsum, I_pad);
        return 1;
    }
    float s = row_scale(amax, eps), inv = 1.0f / s;
    const __m256 vinv = _mm256_set1_ps(inv), hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256i vsum = _mm256_setzero_si256();
#define QD_Q8(p)                                                                               \
    _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_round_ps(                    \
        _mm256_mul_ps(_mm256_loadu_ps(p), vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))))
    i = 0;
    for (; i + 32 <= I; i += 32) {
        __m256i a = QD_Q8(xr + i), b = QD_Q8(xr + i + 8), c = QD_Q8(xr + i + 16), d = QD_Q8(xr + i + 24);
        vsum = _mm256_add_epi32(vsum, _mm256_add_epi32(_mm256_add_epi32(a, b), _mm256_add_epi32(c, d)));
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
        _mm256_storeu_si256((__m256i *)(qr + i), _mm256_permutevar8x32_epi32(p, order));
    }
    for (; i + 8 <= I; i += 8) {
        __m256i a = QD_Q8(xr + i);
        vsum = _mm256_add_epi32(vsum, a);
        __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
        _mm_storel_epi64((__m128i *)(qr + i), _mm_packs_epi16(p16, p16));
    }
#undef QD_Q8
    int32_t sum = hsum_epi32(vsum);
    for (; i < I; i++) {
        float q = nearbyintf(xr[i] * inv);
        q = q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q);
        qr[i] = (int8_t)q;
        sum += (int32_t)q;
    }
    memset(qr + I, 0, (size_t)(I_pad - I));
    *scale = s;
    *rowsum = sum;
    return 0;
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) static int quantize_row_avx512(
    const float *xr, int8_t *qr, float *scale, int32_t *rowsum, int64_t I, int64_t I_pad,
    float eps) {
    const __m512 big = _mm512_set1_ps(FLT_MAX);
    __m512 vmax = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (int64_t i = 0; i < I; i += 16) { /* masked tail: absent lanes read as 0 */
        __mmask16 k = I - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (I - i)) - 1u);
        __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(k, xr + i));
        bad |= _mm512_cmp_ps_mask(a, big, _CMP_NLE_UQ);
        vmax = _mm512_max_ps(vmax, a);
    }
    if (bad) {
        bad_row(qr, scale, rowsum, I_pad);
        return 1;
    }
    float s = row_scale(_mm512_reduce_max_ps(vmax), eps);
    const __m512 vinv = _mm512_set1_ps(1.0f / s);
    const __m512 hi = _mm512_set1_ps(127.0f), lo = _mm512_set1_ps(-127.0f);
    __m512i vsum = _mm512_setzero_si512();
    for (int64_t i = 0; i < I; i += 16) {
        __mmask16 k = I - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (I - i)) - 1u);
        __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, xr + i), vinv);
        v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512i q = _mm512_cvtps_epi32(_mm512_min_ps(hi, _mm512_max_ps(lo, v)));
        vsum = _mm512_add_epi32(vsum, q); /* absent lanes are 0 */
        _mm_mask_storeu_epi8(qr + i, k, _mm512_cvtsepi32_epi8(q));
    }
    memset(qr + I, 0, (size_t)(I_pad - I));
    *scale = s;
    *rowsum = _mm512_reduce_add_epi32(vsum);
    return 0;
}
#endif

typedef int (*quantize_row_fn)(const float *, int8_t *, float *, int32_t *, int64_t, int64_t,
                               float);

/* level as in pick(): 0 = the best the CPU has, 1 = portable C, 2 = at most AVX2 */
static quantize_row_fn pick_quantize(int level) {
#ifdef __x86_64__
    if (level == 0 && has_avx512() && __builtin_cpu_supports("avx512vl")) return quantize_row_avx512;
    if (level != 1 && has_avx2()) return quantize_row_avx2;
#endif
    (void)level;
    return quantize_row_c;
}

/* Quantizing this many values or more splits the rows over threads. */
#define QUANT_PARALLEL_MIN (1 << 17)

int64_t qd_quantize_rows(const float *x, int8_t *xq, float *scale, int32_t *rowsum, int64_t rows,
                         int64_t I, int64_t I_pad, float eps, int level) {
    quantize_row_fn fn = pick_quantize(level);
    int64_t bad_rows = 0;
#pragma omp parallel for schedule(static) reduction(+ : bad_rows) if (rows * I >= QUANT_PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++)
        bad_rows += fn(x + r * I, xq + r * I_pad, scale + r, rowsum + r, I, I_pad, eps);
    return bad_rows;
}

/* Products smaller than this many multiply-adds run on the calling thread: waking the OpenMP
 * pool costs more than it saves (MiniLM-sized layers at batch 1). */
#define PARALLEL_MIN_WORK (1 << 20)

/* The three products. Rows of the output are split over threads; inside a thread, NB batch
 * rows share each weight load. All three apply the scales and the bias and write float. */
static inline float epilogue(int32_t dot, float xs, float ws, const float *bias, int64_t o) {
    return (float)dot * xs * ws + (bias ? bias[o] : 0.0f);
}

/* ------------------------------------------------------------------------------------------
 * W1.58A8 / W2A8: 2-bit codes in the "tile16x16" layout x per-token int8 activations
 * (#15 items 1-2)
 * ------------------------------------------------------------------------------------------
 * Layout: output rows in tiles of 16 (O padded with code-0 rows to a multiple of 16), inputs in
 * chunks of 16 (I padded to a multiple of 16 only: a 384-wide layer is not padded to 512). Tile t, chunk k is 64 bytes;
 * byte 4r + j holds, in bits 2p..2p+1 (p = 0..3), the code of row 16t + r at input
 * 16k + 4p + j. (v >> 2p) & 3 is then a vector whose int32 lane r holds 4 consecutive codes of
 * row r, so one dpbusd multiplies them by 4 broadcast activations of one batch row and adds
 * into lane r: the 16 output rows live in the 16 lanes, there are no horizontal sums, and the
 * epilogue (zero point, scales, bias) is a few vector ops per 16 outputs. (The interleaved-rows
 * idea of BitNet's I2_S, llama.cpp's repacked Q4_0 GEMM and MLAS's tiles, arranged our way.)
 *
 * Register blocking (compile-time block sizes; accumulators stay in registers; one call per
 * block of rows, never per output row; no memset):
 *   1 batch row (GEMV): 4 tiles (64 output rows) a pass, four accumulators a tile (16
 *     independent dpbusd chains; see tern_gemv_masked_impl), software prefetch TERN_PF lines
 *     ahead in each of the 4 weight streams.
 *   2+ rows (GEMM): 2 tiles x up to 8 batch rows (16 accumulators); each 64-byte weight load is
 *     unpacked once for all 8 batch rows, each activation word is a broadcast operand. The
 *     weight panel of one block (I * 8 bytes: 12 KB at 1536 inputs, 32 KB at 4096) stays in
 *     L1/L2 while the batch blocks pass over it. Its weights are prefetched too (the
 *     first batch block streams them from memory: 1.05-1.2x at 2-8 rows, cold weights).
 * AVX2 (maddubs): u8 x s8 pair sums in int16 are at most 2 * 3 * 127 = 762 in magnitude (codes
 *   <= 3, |x| <= 127, which the quantizer guarantees: it clamps to +-127); an int16 lane takes 4
 *   of them a chunk for at most TERN_I16_CHUNKS = 8 chunks (32 * 762 = 24384 < 32767: provably
 *   no saturation) before one madd widens it into int32. Blocks: 2 tiles x 1 row, 1 tile x 4.
 * Every variant computes the same integer dot products and the same float epilogue ops in the
 * same order (setup.py builds with -ffp-contract=off: no fused multiply-add), so all levels
 * agree bit for bit.
 */
#define TERN_I16_CHUNKS 8
/* acc += dpbusd(a (u8), b (s8)) in place: GCC 12 copies the tied accumulator of the intrinsic
 * to a fresh register (a vmovdqa per dpbusd in the W4A8 GEMM) or spills it (blocks of more than
 * ~8 accumulators); used for every hot dpbusd (W4A8 GEMM 1.05-1.1x, W8A8 see i8_vnni_impl) */
#define DPBUSD(acc, a, b) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "vm"(b))
#ifndef TERN_PF
#define TERN_PF 8
#endif
#define TERN_AVX2_BT 4

/* Where a block's results go: y[b][o] = (float)(dot - zp[o] * rowsum[b]) * x_scale[b] *
 * w_scale[o] + bias[o] (zp NULL: zp_const), rows o >= O dropped. Pointers start at the block's
 * first batch row. */
typedef struct {
    const int32_t *zp;
    int32_t zp_const;
    const int32_t *rowsum;
    const float *x_scale;
    const float *w_scale;
    const float *bias;
    float *y;
    int64_t O;
} a8_epi;

static inline void epi_scalar(const a8_epi *e, int64_t b, int64_t o, int32_t acc) {
    int32_t dot = acc - (e->zp ? e->zp[o] : e->zp_const) * e->rowsum[b];
    e->y[b * e->O + o] = epilogue(dot, e->x_scale[b], e->w_scale[o], e->bias, o);
}

/* rt tiles x bt batch rows over all nk chunks, portable C */
static void tern_block_c(const uint8_t *w, int64_t tstride, const int8_t *x, int64_t xstride,
                         int64_t nk, int rt, int bt, int64_t o0, const a8_epi *e) {
    for (int t = 0; t < rt; t++)
        for (int b = 0; b < bt; b++) {
            const uint8_t *wt = w + t * tstride;
            const int8_t *xb = x + b * xstride;
            int32_t acc[16] = {0};
            for (int64_t k = 0; k < nk; k++)
                for (int r = 0; r < 16; r++)
                    for (int j = 0; j < 4; j++) {
                        uint8_t byte = wt[64 * k + 4 * r + j];
                        for (int p = 0; p < 4; p++)
                            acc[r] += (int32_t)((byte >> (2 * p)) & 3) * xb[16 * k + 4 * p + j];
                    }
            for (int r = 0; r < 16; r++)
                if (o0 + 16 * t + r < e->O) epi_scalar(e, b, o0 + 16 * t + r, acc[r]);
        }
}

#ifdef __x86_64__
VNNI_TARGET static inline void epi16_avx512(const a8_epi *e, int64_t b, int64_t o, __m512i acc) {
    int64_t left = e->O - o;
    if (left <= 0) return;
    __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
    __m512i z = e->zp ? _mm512_maskz_loadu_epi32(m, e->zp + o) : _mm512_set1_epi32(e->zp_const);
    __m512i dot = _mm512_sub_epi32(acc, _mm512_mullo_epi32(z, _mm512_set1_epi32(e->rowsum[b])));
    __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(e->x_scale[b]));
    v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, e->w_scale + o));
    v = _mm512_add_ps(v, e->bias ? _mm512_maskz_loadu_ps(m, e->bias + o) : _mm512_setzero_ps());
    _mm512_mask_storeu_ps(e->y + b * e->O + o, m, v);
}

/* RT tiles x BT batch rows (compile-time after inlining), SPLIT accumulators a pair (1 or 2) */
__attribute__((always_inline, target("avx512f,avx512bw,avx512vnni"))) static inline void
tern_vnni_impl(const uint8_t *w, int64_t tstride, const int8_t *x, int64_t xstride, int64_t nk,
               const int RT, const int BT, const int SPLIT, const int PF, int64_t o0,
               const a8_epi *e) {
    const __m512i mask = _mm512_set1_epi8(3);
    __m512i acc[4][8][2];
#pragma GCC unroll 4
    for (int t = 0; t < RT; t++)
#pragma GCC unroll 8
        for (int b = 0; b < BT; b++) acc[t][b][0] = acc[t][b][1] = _mm512_setzero_si512();
    for (int64_t k = 0; k < nk; k++) {
        __m512i v[4];
#pragma GCC unroll 4
        for (int t = 0; t < RT; t++) {
            const uint8_t *wk = w + t * tstride + 64 * k;
            if (PF) _mm_prefetch((const char *)(wk + 64 * TERN_PF), _MM_HINT_T0);
            v[t] = _mm512_loadu_si512((const void *)wk);
        }
#pragma GCC unroll 4
        for (int p = 0; p < 4; p++) {
            __m512i c[4];
#pragma GCC unroll 4
            for (int t = 0; t < RT; t++)
                c[t] = _mm512_and_si512(p ? _mm512_srli_epi16(v[t], 2 * p) : v[t], mask);
#pragma GCC unroll 8
            for (int b = 0; b < BT; b++) { /* one broadcast feeds the RT tiles */
                __m512i xv = _mm512_set1_epi32(load_i32(x + b * xstride + 16 * k + 4 * p));
                const int s = SPLIT == 2 ? (p & 1) : 0;
#pragma GCC unroll 4
                for (int t = 0; t < RT; t++) DPBUSD(acc[t][b][s], c[t], xv);
            }
        }
    }
#pragma GCC unroll 4
    for (int t = 0; t < RT; t++)
#pragma GCC unroll 8
        for (int b = 0; b < BT; b++)
            epi16_avx512(e, b, o0 + 16 * t,
                         SPLIT == 2 ? _mm512_add_epi32(acc[t][b][0], acc[t][b][1]) : acc[t][b][0]);
}

/* Batch 1 without shifts: code p of a byte masked in place (v & (3 << 2p)) is 4^p times the code,
 * so one accumulator per tile and p sums 4^p * sum c x exactly, and the dot product is
 * acc_0 + (acc_1 >> 2) + (acc_2 >> 4) + (acc_3 >> 6) (exact shifts of multiples of 4^p). 4 ANDs
 * and 4 dpbusd per 64-byte chunk instead of 3 shifts more (the GEMV is partly bound by the two
 * vector ports p0 / p5 with AVX-512); RT tiles x 4 accumulators. |acc_3| <= 64 * 3 * 127 * I / 4
 * fits int32 while I_pad <= TERN_MASKED_MAX_I. */
#define TERN_MASKED_MAX_I (1 << 18)
__attribute__((always_inline, target("avx512f,avx512bw,avx512vnni"))) static inline void
tern_gemv_masked_impl(const uint8_t *w, int64_t tstride, const int8_t *x, int64_t nk,
                      const int RT, int64_t o0, const a8_epi *e) {
    __m512i acc[4][4], m[4];
#pragma GCC unroll 4
    for (int p = 0; p < 4; p++) m[p] = _mm512_set1_epi8((char)(3 << (2 * p)));
#pragma GCC unroll 4
    for (int t = 0; t < RT; t++)
#pragma GCC unroll 4
        for (int p = 0; p < 4; p++) acc[t][p] = _mm512_setzero_si512();
    for (int64_t k = 0; k < nk; k++) {
        __m512i v[4];
#pragma GCC unroll 4
        for (int t = 0; t < RT; t++) {
            const uint8_t *wk = w + t * tstride + 64 * k;
            _mm_prefetch((const char *)(wk + 64 * TERN_PF), _MM_HINT_T0);
            v[t] = _mm512_loadu_si512((const void *)wk);
        }
#pragma GCC unroll 4
        for (int p = 0; p < 4; p++) {
            __m512i xv = _mm512_set1_epi32(load_i32(x + 16 * k + 4 * p));
#pragma GCC unroll 4
            for (int t = 0; t < RT; t++)
                DPBUSD(acc[t][p], _mm512_and_si512(v[t], m[p]), xv);
        }
    }
#pragma GCC unroll 4
    for (int t = 0; t < RT; t++) {
        __m512i dot = _mm512_add_epi32(
            _mm512_add_epi32(acc[t][0], _mm512_srai_epi32(acc[t][1], 2)),
            _mm512_add_epi32(_mm512_srai_epi32(acc[t][2], 4), _mm512_srai_epi32(acc[t][3], 6)));
        epi16_avx512(e, 0, o0 + 16 * t, dot);
    }
}

VNNI_TARGET static void tern_gemv_vnni(const uint8_t *w, int64_t tstride, const int8_t *x,
                                       int64_t nk, int rt, int64_t o0, const a8_epi *e) {
    if (16 * nk <= TERN_MASKED_MAX_I) {
        switch (rt) { /* fewer than 4 tiles: the last block of a layer */
        case 1: tern_gemv_masked_impl(w, tstride, x, nk, 1, o0, e); break;
        case 2: tern_gemv_masked_impl(w, tstride, x, nk, 2, o0, e); break;
        case 3: tern_gemv_masked_impl(w, tstride, x, nk, 3, o0, e); break;
        default: tern_gemv_masked_impl(w, tstride, x, nk, 4, o0, e);
        }
        return;
    }
    switch (rt) {
    case 1: tern_vnni_impl(w, tstride, x, 0, nk, 1, 1, 2, 1, o0, e); break;
    case 2: tern_vnni_impl(w, tstride, x, 0, nk, 2, 1, 2, 1, o0, e); break;
    case 3: tern_vnni_impl(w, tstride, x, 0, nk, 3, 1, 2, 1, o0, e); break;
    default: tern_vnni_impl(w, tstride, x, 0, nk, 4, 1, 2, 1, o0, e);
    }
}

VNNI_TARGET static void tern_gemm_vnni(const uint8_t *w, int64_t tstride, const int8_t *x,
                                       int64_t xstride, int64_t nk, int rt, int bt, int64_t o0,
                                       const a8_epi *e) {
#define TV(n, sp)                                                                              \
    if (rt == 2) tern_vnni_impl(w, tstride, x, xstride, nk, 2, n, sp, 1, o0, e);             \
    else tern_vnni_impl(w, tstride, x, xstride, nk, 1, n, sp, 1, o0, e)
    switch (bt) {
    case 1: TV(1, 2); break;
    case 2: TV(2, 2); break;
    case 3: TV(3, 1); break;
    case 4: TV(4, 1); break;
    case 5: TV(5, 1); break;
    case 6: TV(6, 1); break;
    case 7: TV(7, 1); break;
    default: TV(8, 1);
    }
#undef TV
}

__attribute__((target("avx2"))) static inline void epi8_avx2(const a8_epi *e, int64_t b,
                                                               int64_t o, __m256i acc) {
    int64_t left = e->O - o;
    if (left <= 0) return;
    if (left < 8) {
        int32_t part[8];
        _mm256_storeu_si256((__m256i *)part, acc);
        for (int64_t r = 0; r < left; r++) epi_scalar(e, b, o + r, part[r]);
        return;
    }
    __m256i z = e->zp ? _mm256_loadu_si256((const __m256i *)(e->zp + o))
                      : _mm256_set1_epi32(e->zp_const);
    __m256i dot = _mm256_sub_epi32(acc, _mm256_mullo_epi32(z, _mm256_set1_epi32(e->rowsum[b])));
    __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(e->x_scale[b]));
    v = _mm256_mul_ps(v, _mm256_loadu_ps(e->w_scale + o));
    v = _mm256_add_ps(v, e->bias ? _mm256_loadu_ps(e->bias + o) : _mm256_setzero_ps());
    _mm256_storeu_ps(e->y + b * e->O + o, v);
}

__attribute__((always_inline, target("avx2"))) static inline void
tern_avx2_impl(const uint8_t *w, int64_t tstride, const int8_t *x, int64_t xstride, int64_t nk,
               const int RT, const int BT, const int PF, int64_t o0, const a8_epi *e) {
    const __m256i mask = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    __m256i a32[2][4][2];
#pragma GCC unroll 2
    for (int t = 0; t < RT; t++)
#pragma GCC unroll 4
        for (int b = 0; b < BT; b++) a32[t][b][0] = a32[t][b][1] = _mm256_setzero_si256();
    for (int64_t k0 = 0; k0 < nk; k0 += TERN_I16_CHUNKS) {
        int64_t k1 = nk - k0 < TERN_I16_CHUNKS ? nk : k0 + TERN_I16_CHUNKS;
        __m256i a16[2][4][2];
#pragma GCC unroll 2
        for (int t = 0; t < RT; t++)
#pragma GCC unroll 4
            for (int b = 0; b < BT; b++) a16[t][b][0] = a16[t][b][1] = _mm256_setzero_si256();
        for (int64_t k = k0; k < k1; k++) {
#pragma GCC unroll 2
            for (int t = 0; t < RT; t++) {
                const uint8_t *wk = w + t * tstride + 64 * k;
                if (PF) _mm_prefetch((const char *)(wk + 64 * TERN_PF), _MM_HINT_T0);
                __m256i v0 = _mm256_loadu_si256((const __m256i *)wk);
                __m256i v1 = _mm256_loadu_si256((const __m256i *)(wk + 32));
#pragma GCC unroll 4
                for (int p = 0; p < 4; p++) {
                    __m256i c0 = _mm256_and_si256(p ? _mm256_srli_epi16(v0, 2 * p) : v0, mask);
                    __m256i c1 = _mm256_and_si256(p ? _mm256_srli_epi16(v1, 2 * p) : v1, mask);
#pragma GCC unroll 4
                    for (int b = 0; b < BT; b++) {
                        __m256i xv = _mm256_set1_epi32(load_i32(x + b * xstride + 16 * k + 4 * p));
                        a16[t][b][0] = _mm256_add_epi16(a16[t][b][0], _mm256_maddubs_epi16(c0, xv));
                        a16[t][b][1] = _mm256_add_epi16(a16[t][b][1], _mm256_maddubs_epi16(c1, xv));
                        /* keep the adds in this order (no reassociated trees of temporaries:
                           with 16 ymm registers those spill) */
                        __asm__("" : "+x"(a16[t][b][0]), "+x"(a16[t][b][1]));
                    }
                }
            }
        }
#pragma GCC unroll 2
        for (int t = 0; t < RT; t++)
#pragma GCC unroll 4
            for (int b = 0; b < BT; b++)
                for (int h = 0; h < 2; h++)
                    a32[t][b][h] = _mm256_add_epi32(a32[t][b][h], _mm256_madd_epi16(a16[t][b][h], ones));
    }
#pragma GCC unroll 2
    for (int t = 0; t < RT; t++)
#pragma GCC unroll 4
        for (int b = 0; b < BT; b++) {
            epi8_avx2(e, b, o0 + 16 * t, a32[t][b][0]);
            epi8_avx2(e, b, o0 + 16 * t + 8, a32[t][b][1]);
        }
}

__attribute__((target("avx2"))) static void tern_gemv_avx2(const uint8_t *w, int64_t tstride,
                                                            const int8_t *x, int64_t nk, int rt,
                                                            int64_t o0, const a8_epi *e) {
    if (rt == 2) tern_avx2_impl(w, tstride, x, 0, nk, 2, 1, 1, o0, e);
    else tern_avx2_impl(w, tstride, x, 0, nk, 1, 1, 1, o0, e);
}

__attribute__((target("avx2"))) static void tern_gemm_avx2(const uint8_t *w, int64_t tstride,
                                                            const int8_t *x, int64_t xstride,
                                                            int64_t nk, int bt, int64_t o0,
                                                            const a8_epi *e) {
#define TA(n) tern_avx2_impl(w, tstride, x, xstride, nk, 1, n, 0, o0, e)
    switch (bt) { /* bt <= TERN_AVX2_BT = 4 */
    case 1: TA(1); break;
    case 2: TA(2); break;
    case 3: TA(3); break;
    default: TA(4);
    }
#undef TA
}
#endif

/* y[b, o] = (sum_i c[o, i] x[b, i] - zp[o] * rowsum[b]) * x_scale[b] * w_scale[o] + bias[o]
 * (zp NULL: 1, the ternary offset). w: the tile16x16 layout above (ceil(O / 16) * 16 rows);
 * x: [B][I_pad] int8 codes, I_pad a multiple of 16, zero past the layer's inputs. */
void qd_ternary_gemm(const uint8_t *w, const int8_t *x, const int32_t *rowsum, const int32_t *zp,
                     const float *x_scale, const float *w_scale, const float *bias, float *y,
                     int64_t B, int64_t O, int64_t I_pad, int level) {
    int64_t nk = I_pad / 16, tstride = 64 * nk, n_tiles = (O + 15) / 16;
    int path = pick(level);
    /* tiles a block and batch rows a block, per path (see above) */
    int rt = path == 2 ? (B == 1 ? 4 : 2) : path == 1 ? (B == 1 ? 2 : 1) : 1;
    int bt_max = path == 2 ? 8 : path == 1 ? TERN_AVX2_BT : 4;
    int64_t n_units = (n_tiles + rt - 1) / rt;
    if (B <= 0 || O <= 0) return;
#pragma omp parallel for schedule(static) if (B * O * I_pad >= PARALLEL_MIN_WORK)
    for (int64_t u = 0; u < n_units; u++) {
        const uint8_t *wu = w + u * rt * tstride;
        int64_t o0 = u * rt * 16;
        int urt = n_tiles - u * rt < rt ? (int)(n_tiles - u * rt) : rt; /* tiles in this block */
        for (int64_t b0 = 0; b0 < B; b0 += bt_max) {
            int bt = B - b0 < bt_max ? (int)(B - b0) : bt_max;
            a8_epi e = {zp, 1, rowsum + b0, x_scale + b0, w_scale, bias, y + b0 * O, O};
            const int8_t *xb = x + b0 * I_pad;
#ifdef __x86_64__
            if (path == 2) {
                if (B == 1) tern_gemv_vnni(wu, tstride, xb, nk, urt, o0, &e);
                else tern_gemm_vnni(wu, tstride, xb, I_pad, nk, urt, bt, o0, &e);
                continue;
            }
            if (path == 1) {
                if (B == 1) tern_gemv_avx2(wu, tstride, xb, nk, urt, o0, &e);
                else tern_gemm_avx2(wu, tstride, xb, I_pad, nk, bt, o0, &e);
                continue;
            }
#endif
            tern_block_c(wu, tstride, xb, I_pad, nk, urt, bt, o0, &e);
        }
    }
}

/* ------------------------------------------------------------------------------------------
 * W8A8 with VNNI, register-blocked (#15 items 1-2). The weights stay in their row layout
 * (int8, [O][I]) because from INT_MM_MIN_ROWS rows on torch._int_mm (oneDNN, AMX on this Xeon)
 * reads the same tensor; this kernel covers batch 1 (GEMV: 8 output rows a pass, 8 independent
 * dpbusd chains, software prefetch) and the rows below that (6 output rows x 4 batch rows, 24
 * accumulators in registers, every weight load feeding 4 batch rows and every activation load
 * 6 output rows; the dpbusd is inline asm so that GCC accumulates in place instead of copying
 * and spilling the accumulators). The inputs run in unmasked steps of 64 and a masked last
 * step. The accumulators are reduced 16 at a time by a transposing add tree (45 instructions
 * for 16 sums instead of 16 separate reductions). dpbusd multiplies u8 x s8, so the activations are
 * shifted to u8 (x ^ 0x80 = x + 128) and 128 * sum_i w[o, i] (wsum) is subtracted afterwards,
 * which keeps the integer dot product exact.
 * ------------------------------------------------------------------------------------------ */
#ifdef __x86_64__
/* lane l of the result = the sum of the 16 lanes of a[l] */
VNNI_TARGET static inline __m512i hsum16_epi32(const __m512i *a) {
    __m512i b[8], c[4], d[2];
#pragma GCC unroll 8
    for (int j = 0; j < 8; j++) /* 128-bit lane: [a2j, a2j+1, a2j, a2j+1] partial sums */
        b[j] = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2 * j], a[2 * j + 1]),
                                _mm512_unpackhi_epi32(a[2 * j], a[2 * j + 1]));
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) /* 128-bit lane: [a4j, .., a4j+3] partial sums */
        c[j] = _mm512_add_epi32(_mm512_unpacklo_epi64(b[2 * j], b[2 * j + 1]),
                                _mm512_unpackhi_epi64(b[2 * j], b[2 * j + 1]));
#pragma GCC unroll 2
    for (int j = 0; j < 2; j++) /* lanes: c2j (L0+L1), c2j (L2+L3), c2j+1 (..), c2j+1 (..) */
        d[j] = _mm512_add_epi32(_mm512_shuffle_i32x4(c[2 * j], c[2 * j + 1], 0x88),
                                _mm512_shuffle_i32x4(c[2 * j], c[2 * j + 1], 0xDD));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(d[0], d[1], 0x88),
                            _mm512_shuffle_i32x4(d[0], d[1], 0xDD));
}

/* RB output rows (rows of them real: the others repeat the last real row and are dropped) x BB
 * batch rows, accumulator b * RB + r (at most 24: with the BB activation vectors and one weight
 * vector, 31 of the 32 zmm registers). The inputs run in unmasked steps of 64 and one masked
 * last step; PF: prefetch each weight row I8_PF lines ahead (the first batch block streams the
 * weights from memory: 1.05-1.15x at 2-16 rows on cold weights; later blocks find them in L1). */
#ifndef I8_PF
#define I8_PF 8
#endif
__attribute__((always_inline, target("avx512f,avx512bw,avx512vnni"))) static inline void
i8_vnni_impl(const int8_t *w, const int8_t *x, int64_t I, const int RB, const int BB,
             const int PF, const int FLIP, int rows, int64_t o0, const int32_t *wsum, const float *x_scale,
             const float *w_scale, const float *bias, float *y, int64_t O) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512i acc[32];
    const int8_t *wr[8];
#pragma GCC unroll 32
    for (int a = 0; a < 32; a++) acc[a] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int r = 0; r < RB; r++) wr[r] = w + (r < rows ? r : rows - 1) * I;
    int64_t i = 0;
    for (; i + 64 <= I; i += 64) {
        __m512i wv[8];
#pragma GCC unroll 8
        for (int r = 0; r < RB; r++) {
            if (PF) _mm_prefetch((const char *)(wr[r] + i + 64 * I8_PF), _MM_HINT_T0);
            wv[r] = _mm512_loadu_si512((const void *)(wr[r] + i));
        }
#pragma GCC unroll 8
        for (int b = 0; b < BB; b++) {
            __m512i xv = _mm512_loadu_si512((const void *)(x + b * I + i));
            if (!FLIP) xv = _mm512_xor_si512(xv, flip); /* FLIP: x holds the u8 codes already */
#pragma GCC unroll 8
            for (int r = 0; r < RB; r++)
                DPBUSD(acc[b * RB + r], xv, wv[r]);
        }
    }
    if (i < I) { /* absent lanes: 0 ^ 0x80 times a zero weight */
        __mmask64 m = ((__mmask64)1 << (I - i)) - 1;
        __m512i wv[8];
#pragma GCC unroll 8
        for (int r = 0; r < RB; r++) wv[r] = _mm512_maskz_loadu_epi8(m, wr[r] + i);
#pragma GCC unroll 8
        for (int b = 0; b < BB; b++) {
            __m512i xv = _mm512_maskz_loadu_epi8(m, x + b * I + i);
            if (!FLIP) xv = _mm512_xor_si512(xv, flip);
#pragma GCC unroll 8
            for (int r = 0; r < RB; r++)
                DPBUSD(acc[b * RB + r], xv, wv[r]);
        }
    }
    int32_t dot[32] = {0};
    _mm512_storeu_si512((void *)dot, hsum16_epi32(acc));
    if (RB * BB > 16) _mm512_storeu_si512((void *)(dot + 16), hsum16_epi32(acc + 16));
    for (int b = 0; b < BB; b++)
        for (int r = 0; r < rows; r++) {
            int64_t o = o0 + r;
            y[b * O + o] = epilogue(dot[b * RB + r] - 128 * wsum[o], x_scale[b], w_scale[o], bias, o);
        }
}

/* The GEMM block: I8_RB output rows x up to I8_BB batch rows (24 accumulators). Interleaved
 * on the Sapphire Rapids VM (1 thread, 1024x1024 to 4096x4096, 32 rows): ~160-170 G
 * multiply-adds/s, about half the dpbusd peak (two 512-bit dpbusd a cycle); 4 x 4 was 10-20%
 * slower, 4 x 6, 8 x 3, 4 x 5 and 5 x 4 (weights in registers) within the noise of 6 x 4. */
#define I8_RB 6
#define I8_BB 4

VNNI_TARGET static void i8_block_vnni(const int8_t *w, const int8_t *x, int64_t I, int bb,
                                      int flipped, int rows, int64_t o0, const int32_t *wsum,
                                      const float *x_scale, const float *w_scale,
                                      const float *bias, float *y, int64_t O) {
#define I8V(R, N, F) i8_vnni_impl(w, x, I, R, N, 1, F, rows, o0, wsum, x_scale, w_scale, bias, y, O)
    if (!flipped) {
        switch (bb) {
        case 0: I8V(8, 1, 0); break; /* batch 1: the GEMV block */
        case 1: I8V(I8_RB, 1, 0); break;
        case 2: I8V(I8_RB, 2, 0); break;
        case 3: I8V(I8_RB, 3, 0); break;
        default: I8V(I8_RB, 4, 0);
        }
        return;
    }
    switch (bb) { /* the activations already as u8 (x ^ 0x80): no xor in the loop */
    case 0: I8V(8, 1, 1); break;
    case 1: I8V(I8_RB, 1, 1); break;
    case 2: I8V(I8_RB, 2, 1); break;
    case 3: I8V(I8_RB, 3, 1); break;
    default: I8V(I8_RB, 4, 1);
    }
#undef I8V
}
#endif

#ifdef __x86_64__
/* W8A8 with AVX2 (no VNNI), register-blocked like the VNNI kernel: RB output rows (rows of them
 * real) x BB batch rows, accumulator b * RB + r; maddubs multiplies u8 x s8, so each pair is
 * |w| x sign(x, w) (pair sums <= 2 * 127 * 127: no int16 saturation). Batch 1
 * streams 4 weight rows at once (prefetched); the GEMM block is 2 rows x 4 batch rows. */
__attribute__((always_inline, target("avx2"))) static inline void
i8_avx2_impl(const int8_t *w, const int8_t *x, int64_t I, const int RB, const int BB,
             const int PF, int rows, int64_t o0, const float *x_scale, const float *w_scale,
             const float *bias, float *y, int64_t O) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[8];
    const int8_t *wr[4];
#pragma GCC unroll 8
    for (int a = 0; a < RB * BB; a++) acc[a] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int r = 0; r < RB; r++) wr[r] = w + (r < rows ? r : rows - 1) * I;
    int64_t i = 0;
    for (; i + 32 <= I; i += 32) {
        __m256i wv[4], wa[4];
#pragma GCC unroll 4
        for (int r = 0; r < RB; r++) {
            if (PF) _mm_prefetch((const char *)(wr[r] + i + 64 * I8_PF), _MM_HINT_T0);
            wv[r] = _mm256_loadu_si256((const __m256i *)(wr[r] + i));
            wa[r] = _mm256_sign_epi8(wv[r], wv[r]);
        }
#pragma GCC unroll 4
        for (int b = 0; b < BB; b++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(x + b * I + i));
#pragma GCC unroll 4
            for (int r = 0; r < RB; r++)
                acc[b * RB + r] = _mm256_add_epi32(
                    acc[b * RB + r],
                    _mm256_madd_epi16(_mm256_maddubs_epi16(wa[r], _mm256_sign_epi8(xv, wv[r])), ones));
        }
    }
    for (int b = 0; b < BB; b++)
        for (int r = 0; r < rows; r++) {
            int32_t dot = hsum_epi32(acc[b * RB + r]);
            for (int64_t j = i; j < I; j++) dot += (int32_t)wr[r][j] * x[b * I + j];
            int64_t o = o0 + r;
            y[b * O + o] = epilogue(dot, x_scale[b], w_scale[o], bias, o);
        }
}

#define I8_AVX2_RB 2
#define I8_AVX2_BB 4

__attribute__((target("avx2"))) static void i8_block_avx2(const int8_t *w, const int8_t *x,
                                                           int64_t I, int bb, int rows,
                                                           int64_t o0, const float *x_scale,
                                                           const float *w_scale,
                                                           const float *bias, float *y,
                                                           int64_t O) {
#define I8A(R, N, PF) i8_avx2_impl(w, x, I, R, N, PF, rows, o0, x_scale, w_scale, bias, y, O)
    switch (bb) {
    case 0: I8A(4, 1, 1); break; /* batch 1: the GEMV block */
    case 1: I8A(I8_AVX2_RB, 1, 0); break;
    case 2: I8A(I8_AVX2_RB, 2, 0); break;
    case 3: I8A(I8_AVX2_RB, 3, 0); break;
    default: I8A(I8_AVX2_RB, 4, 0);
    }
#undef I8A
}
#endif

/* y[b, o] = (sum_i w[o, i] x[b, i]) * x_scale[b] * w_scale[o] + bias[o]; flipped (VNNI path
 * only): x holds x ^ 0x80 (the u8 codes dpbusd takes), made once per call by qd_a8_linear
 * instead of once per block in the loop (4 of the 28 vector ops of a 6 x 4 step) */
static void int8_gemm(const int8_t *w, const int8_t *x, const int32_t *wsum, const float *x_scale,
                      const float *w_scale, const float *bias, float *y, int64_t B, int64_t O,
                      int64_t I, int level, int flipped) {
    int path = pick(level);
    (void)path; /* portable builds: C only */
#ifdef __x86_64__
    if (path == 2) { /* blocks of RB output rows x up to I8_BB batch rows */
        int64_t RB = B == 1 ? 8 : I8_RB, n_blocks = (O + RB - 1) / RB;
#pragma omp parallel for schedule(static) if (B * O * I >= PARALLEL_MIN_WORK)
        for (int64_t u = 0; u < n_blocks; u++) {
            int64_t o0 = u * RB;
            int rows = O - o0 < RB ? (int)(O - o0) : (int)RB;
            for (int64_t b0 = 0; b0 < B; b0 += I8_BB) {
                int bb = B == 1 ? 0 : (B - b0 < I8_BB ? (int)(B - b0) : I8_BB);
                i8_block_vnni(w + o0 * I, x + b0 * I, I, bb, flipped, rows, o0, wsum,
                              x_scale + b0, w_scale, bias, y + b0 * O, O);
            }
        }
        return;
    }
    if (path == 1) { /* blocks of 4 output rows (batch 1) or 2 x up to 4 batch rows */
        int64_t RB = B == 1 ? 4 : I8_AVX2_RB, n_blocks = (O + RB - 1) / RB;
#pragma omp parallel for schedule(static) if (B * O * I >= PARALLEL_MIN_WORK)
        for (int64_t u = 0; u < n_blocks; u++) {
            int64_t o0 = u * RB;
            int rows = O - o0 < RB ? (int)(O - o0) : (int)RB;
            for (int64_t b0 = 0; b0 < B; b0 += I8_AVX2_BB) {
                int bb = B == 1 ? 0 : (B - b0 < I8_AVX2_BB ? (int)(B - b0) : I8_AVX2_BB);
                i8_block_avx2(w + o0 * I, x + b0 * I, I, bb, rows, o0, x_scale + b0, w_scale,
                              bias, y + b0 * O, O);
            }
        }
        return;
    }
#endif
#pragma omp parallel for schedule(static) if (B * O * I >= PARALLEL_MIN_WORK)
    for (int64_t o = 0; o < O; o++) {
        const int8_t *wr = w + o * I;
        for (int64_t r = 0; r < B; r++)
            y[r * O + o] = epilogue(int8_row_c(wr, x + r * I, I), x_scale[r], w_scale[o], bias, o);
    }
}

void qd_int8_gemm(const int8_t *w, const int8_t *x, const int32_t *wsum, const float *x_scale,
                  const float *w_scale, const float *bias, float *y, int64_t B, int64_t O,
                  int64_t I, int level) {
    int8_gemm(w, x, wsum, x_scale, w_scale, bias, y, B, O, I, level, 0);
}


/* ------------------------------------------------------------------------------------------
 * W4A8: 4-bit codes in the tile16 layout x per-token int8 activations
 * ------------------------------------------------------------------------------------------ */


#ifdef __x86_64__
/* Up to NB4 batch rows a pass with VNNI, the tile's codes prefetched TERN_PF lines ahead
 * (1.1-1.3x at 2-16 rows on cold weights) (one int32 accumulator per batch row and group, the
 * low and high nibbles feeding the same one from 5 rows on; float accumulators across groups): the codes are
 * unpacked once for 8 batch rows, and 8 independent dpbusd chains keep the unit busy (#15). */

__attribute__((always_inline, target("avx512f,avx512bw,avx512vnni"))) static inline void
int4_tile_impl(const uint8_t *w, const float *s, const uint8_t *zp, const int8_t **x,
               const int32_t **xgsum, int64_t G, int64_t cpg, const int nb, float *out) {
    const __m512i mask = _mm512_set1_epi8(15);
    const int split = nb <= 4; /* few rows: the nibbles in two chains (dpbusd latency) */
    __m512 acc[NB4];
#pragma GCC unroll 8
    for (int b = 0; b < nb; b++) acc[b] = _mm512_setzero_ps();
    for (int64_t gi = 0; gi < G; gi++) {
        __m512i d[NB4], e[NB4];
#pragma GCC unroll 8
        for (int b = 0; b < nb; b++) d[b] = e[b] = _mm512_setzero_si512();
        for (int64_t kk = 0; kk < cpg; kk++) {
            int64_t k = gi * cpg + kk;
            _mm_prefetch((const char *)(w + 64 * (k + TERN_PF)), _MM_HINT_T0);
            __m512i v = _mm512_loadu_si512((const void *)(w + 64 * k));
            __m512i lo = _mm512_and_si512(v, mask);
            __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
#pragma GCC unroll 8
            for (int b = 0; b < nb; b++) {
                const int8_t *xk = x[b] + 8 * k;
                DPBUSD(d[b], lo, _mm512_set1_epi32(load_i32(xk)));
                if (split) DPBUSD(e[b], hi, _mm512_set1_epi32(load_i32(xk + 4)));
                else DPBUSD(d[b], hi, _mm512_set1_epi32(load_i32(xk + 4)));
            }
        }
        __m512i zv = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(zp + 16 * gi)));
        __m512 sv = _mm512_loadu_ps(s + 16 * gi);
#pragma GCC unroll 8
        for (int b = 0; b < nb; b++) {
            __m512i dd = split ? _mm512_add_epi32(d[b], e[b]) : d[b];
            dd = _mm512_sub_epi32(dd, _mm512_mullo_epi32(zv, _mm512_set1_epi32(xgsum[b][gi])));
            acc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dd), sv, acc[b]);
        }
    }
#pragma GCC unroll 8
    for (int b = 0; b < nb; b++) _mm512_storeu_ps(out + 16 * b, acc[b]);
}

#define NB_SWITCH(nb, CALL) \
    switch (nb) { case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; default: CALL(4); }

/* Batch 1 (GEMV, #15 item 1): RT tiles (RT * 16 output rows) a pass, each tile its own weight
 * stream (tstride bytes apart) prefetched TERN_PF lines ahead, the low and high nibbles in two
 * int32 chains a tile (2 * RT independent dpbusd chains instead of 2), the two broadcast
 * activation words shared by the RT tiles. Per tile and group the same ops in the same order as
 * int4_tile_impl (so the results are those of the one-tile path bit for bit; the group scales
 * and zero points prefetched a few groups ahead: 2-7% on cold weights); out[16 t + r]
 * before x_scale and bias. s / zp: the first tile's, sstride apart. */
__attribute__((always_inline, target("avx512f,avx512bw,avx512vnni"))) static inline void
int4_gemv_impl(const uint8_t *w, int64_t tstride, const float *s, const uint8_t *zp,
               int64_t sstride, const int8_t *x, const int32_t *xgsum, int64_t G, int64_t cpg,
               const int RT, float *out) {
    const __m512i mask = _mm512_set1_epi8(15);
    __m512 acc[4];
#pragma GCC unroll 4
    for (int t = 0; t < RT; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t gi = 0; gi < G; gi++) {
        __m512i d[4], e[4];
#pragma GCC unroll 4
        for (int t = 0; t < RT; t++) d[t] = e[t] = _mm512_setzero_si512();
        for (int64_t kk = 0; kk < cpg; kk++) {
            int64_t k = gi * cpg + kk;
            __m512i xlo = _mm512_set1_epi32(load_i32(x + 8 * k));
            __m512i xhi = _mm512_set1_epi32(load_i32(x + 8 * k + 4));
#pragma GCC unroll 4
            for (int t = 0; t < RT; t++) {
                const uint8_t *wk = w + t * tstride + 64 * k;
                _mm_prefetch((const char *)(wk + 64 * TERN_PF), _MM_HINT_T0);
                __m512i v = _mm512_loadu_si512((const void *)wk);
                DPBUSD(d[t], _mm512_and_si512(v, mask), xlo);
                DPBUSD(e[t], _mm512_and_si512(_mm512_srli_epi16(v, 4), mask), xhi);
            }
        }
        __m512i xg = _mm512_set1_epi32(xgsum[gi]);
#pragma GCC unroll 4
        for (int t = 0; t < RT; t++) {
            _mm_prefetch((const char *)(s + t * sstride + 16 * (gi + 4)), _MM_HINT_T0);
            _mm_prefetch((const char *)(zp + t * sstride + 16 * (gi + 16)), _MM_HINT_T0);
            __m512i zv = _mm512_cvtepu8_epi32(
                _mm_loadu_si128((const __m128i *)(zp + t * sstride + 16 * gi)));
            __m512 sv = _mm512_loadu_ps(s + t * sstride + 16 * gi);
            __m512i dd = _mm512_sub_epi32(_mm512_add_epi32(d[t], e[t]), _mm512_mullo_epi32(zv, xg));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dd), sv, acc[t]);
        }
    }
#pragma GCC unroll 4
    for (int t = 0; t < RT; t++) _mm512_storeu_ps(out + 16 * t, acc[t]);
}

#define INT4_GEMV_TILES 4

VNNI_TARGET static void int4_gemv_vnni(const uint8_t *w, int64_t tstride, const float *s,
                                       const uint8_t *zp, int64_t sstride, const int8_t *x,
                                       const int32_t *xgsum, int64_t G, int64_t cpg, int rt,
                                       float *out) {
#define I4G(n) int4_gemv_impl(w, tstride, s, zp, sstride, x, xgsum, G, cpg, n, out)
    switch (rt) { /* fewer than 4 tiles: the last block of a layer */
    case 1: I4G(1); break;
    case 2: I4G(2); break;
    case 3: I4G(3); break;
    default: I4G(4);
    }
#undef I4G
}

/* The VNNI GEMM over 2 tiles a pass (2+ batch rows): each pair of broadcast activation words
 * feeds both tiles (16 broadcasts per 32 dpbusd instead of per 16: the one-tile loop is bound
 * by its loads and the two vector ports), the 2 x nb int32 sums in registers, the float sums in
 * out[t][b][16] (loaded and stored once per group). Per tile, row and group the same ops in the
 * same order as int4_tile_impl: the same results bit for bit. */
__attribute__((always_inline, target("avx512f,avx512bw,avx512vnni"))) static inline void
int4_tile2_impl(const uint8_t *w, int64_t tstride, const float *s, const uint8_t *zp,
                int64_t sstride, const int8_t **x, const int32_t **xgsum, int64_t G, int64_t cpg,
                const int nb, float *out) {
    const __m512i mask = _mm512_set1_epi8(15);
#pragma GCC unroll 2
    for (int t = 0; t < 2; t++)
#pragma GCC unroll 8
        for (int b = 0; b < nb; b++) _mm512_storeu_ps(out + (t * NB4 + b) * 16, _mm512_setzero_ps());
    for (int64_t gi = 0; gi < G; gi++) {
        __m512i d[2][NB4];
#pragma GCC unroll 2
        for (int t = 0; t < 2; t++)
#pragma GCC unroll 8
            for (int b = 0; b < nb; b++) d[t][b] = _mm512_setzero_si512();
        for (int64_t kk = 0; kk < cpg; kk++) {
            int64_t k = gi * cpg + kk;
            __m512i lo[2], hi[2];
#pragma GCC unroll 2
            for (int t = 0; t < 2; t++) {
                const uint8_t *wk = w + t * tstride + 64 * k;
                _mm_prefetch((const char *)(wk + 64 * TERN_PF), _MM_HINT_T0);
                __m512i v = _mm512_loadu_si512((const void *)wk);
                lo[t] = _mm512_and_si512(v, mask);
                hi[t] = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
            }
#pragma GCC unroll 8
            for (int b = 0; b < nb; b++) {
                const int8_t *xk = x[b] + 8 * k;
                __m512i xl = _mm512_set1_epi32(load_i32(xk)), xh = _mm512_set1_epi32(load_i32(xk + 4));
                DPBUSD(d[0][b], lo[0], xl);
                DPBUSD(d[1][b], lo[1], xl);
                DPBUSD(d[0][b], hi[0], xh);
                DPBUSD(d[1][b], hi[1], xh);
            }
        }
#pragma GCC unroll 2
        for (int t = 0; t < 2; t++) {
            __m512i zv = _mm512_cvtepu8_epi32(
                _mm_loadu_si128((const __m128i *)(zp + t * sstride + 16 * gi)));
            __m512 sv = _mm512_loadu_ps(s + t * sstride + 16 * gi);
#pragma GCC unroll 8
            for (int b = 0; b < nb; b++) {
                float *o = out + (t * NB4 + b) * 16;
                __m512i dd = _mm512_sub_epi32(d[t][b], _mm512_mullo_epi32(zv, _mm512_set1_epi32(xgsum[b][gi])));
                _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_cvtepi32_ps(dd), sv, _mm512_loadu_ps(o)));
            }
        }
    }
}

VNNI_TARGET static void int4_tile2_vnni(const uint8_t *w, int64_t tstride, const float *s,
                                        const uint8_t *zp, int64_t sstride, const int8_t **x,
                                        const int32_t **xgsum, int64_t G, int64_t cpg, int nb,
                                        float *out) {
#define I4T(n) int4_tile2_impl(w, tstride, s, zp, sstride, x, xgsum, G, cpg, n, out)
    switch (nb) {
    case 1: I4T(1); break;
    case 2: I4T(2); break;
    case 3: I4T(3); break;
    case 4: I4T(4); break;
    case 5: I4T(5); break;
    case 6: I4T(6); break;
    case 7: I4T(7); break;
    default: I4T(8);
    }
#undef I4T
}

/* One tile of 16 output rows for nb (<= NB) batch rows; out[b][r] before x_scale and bias. */
VNNI_TARGET static void int4_tile_vnni(const uint8_t *w, const float *s, const uint8_t *zp,
                                       const int8_t **x, const int32_t **xgsum, int64_t G,
                                       int64_t cpg, int nb, float *out) {
#define I4(n) int4_tile_impl(w, s, zp, x, xgsum, G, cpg, n, out)
    switch (nb) {
    case 1: I4(1); break;
    case 2: I4(2); break;
    case 3: I4(3); break;
    case 4: I4(4); break;
    case 5: I4(5); break;
    case 6: I4(6); break;
    case 7: I4(7); break;
    default: I4(8);
    }
#undef I4
}

/* nb a compile-time constant after inlining (the accumulators stay in registers; with a run-time
 * count they lived on the stack) */
__attribute__((always_inline, target("avx2,fma"))) static inline void int4_tile_avx2_impl(
    const uint8_t *w, const float *s, const uint8_t *zp, const int8_t **x, const int32_t **xgsum,
    int64_t G, int64_t cpg, const int nb, float *out) {
    const __m256i mask = _mm256_set1_epi8(15);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int h = 0; h < 2; h++) { /* rows 8h .. 8h + 7: the h-th 32 bytes of each 64 */
        __m256 acc[NB];
#pragma GCC unroll 4
        for (int b = 0; b < nb; b++) acc[b] = _mm256_setzero_ps();
        for (int64_t gi = 0; gi < G; gi++) {
            __m256i d[NB];
    #pragma GCC unroll 4
        for (int b = 0; b < nb; b++) d[b] = _mm256_setzero_si256();
            for (int64_t kk = 0; kk < cpg; kk++) {
                int64_t k = gi * cpg + kk;
                __m256i v = _mm256_loadu_si256((const __m256i *)(w + 64 * k + 32 * h));
                __m256i lo = _mm256_and_si256(v, mask);
                __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
        #pragma GCC unroll 4
        for (int b = 0; b < nb; b++) {
                    const int8_t *xk = x[b] + 8 * k;
                    /* pair sums <= 2 * 15 * 128: lo + hi fits int16 */
                    __m256i p = _mm256_add_epi16(
                        _mm256_maddubs_epi16(lo, _mm256_set1_epi32(load_i32(xk))),
                        _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load_i32(xk + 4))));
                    d[b] = _mm256_add_epi32(d[b], _mm256_madd_epi16(p, ones));
                }
            }
            __m256i zv = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(zp + 16 * gi + 8 * h)));
            __m256 sv = _mm256_loadu_ps(s + 16 * gi + 8 * h);
    #pragma GCC unroll 4
        for (int b = 0; b < nb; b++) {
                __m256i dd = _mm256_sub_epi32(d[b], _mm256_mullo_epi32(zv, _mm256_set1_epi32(xgsum[b][gi])));
                acc[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dd), sv, acc[b]);
            }
        }
#pragma GCC unroll 4
        for (int b = 0; b < nb; b++) _mm256_storeu_ps(out + 16 * b + 8 * h, acc[b]);
    }
}

__attribute__((target("avx2,fma"))) static void int4_tile_avx2(
    const uint8_t *w, const float *s, const uint8_t *zp, const int8_t **x, const int32_t **xgsum,
    int64_t G, int64_t cpg, int nb, float *out) {
#define I4A(n) int4_tile_avx2_impl(w, s, zp, x, xgsum, G, cpg, n, out)
    NB_SWITCH(nb, I4A)
#undef I4A
}

/* The AVX2 batch-1 GEMV: INT4_GEMV_TILES_AVX2 tiles a pass, both 32-byte halves of every 64-byte
 * chunk from one load pass (int4_tile_avx2 walks each tile twice, once per half), each tile a
 * prefetched stream; per half the ops of int4_tile_avx2 in its order (the same results bit for
 * bit). 2 tiles: 8 accumulators of the 16 ymm registers. */
#define INT4_GEMV_TILES_AVX2 2
__attribute__((always_inline, target("avx2,fma"))) static inline void
int4_gemv_avx2_impl(const uint8_t *w, int64_t tstride, const float *s, const uint8_t *zp,
                    int64_t sstride, const int8_t *x, const int32_t *xgsum, int64_t G,
                    int64_t cpg, const int RT, float *out) {
    const __m256i mask = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    __m256 acc[INT4_GEMV_TILES_AVX2][2];
#pragma GCC unroll 2
    for (int t = 0; t < RT; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    for (int64_t gi = 0; gi < G; gi++) {
        __m256i d[INT4_GEMV_TILES_AVX2][2];
#pragma GCC unroll 2
        for (int t = 0; t < RT; t++) d[t][0] = d[t][1] = _mm256_setzero_si256();
        for (int64_t kk = 0; kk < cpg; kk++) {
            int64_t k = gi * cpg + kk;
            __m256i xlo = _mm256_set1_epi32(load_i32(x + 8 * k));
            __m256i xhi = _mm256_set1_epi32(load_i32(x + 8 * k + 4));
#pragma GCC unroll 2
            for (int t = 0; t < RT; t++) {
                const uint8_t *wk = w + t * tstride + 64 * k;
                _mm_prefetch((const char *)(wk + 64 * TERN_PF), _MM_HINT_T0);
#pragma GCC unroll 2
                for (int h = 0; h < 2; h++) {
                    __m256i v = _mm256_loadu_si256((const __m256i *)(wk + 32 * h));
                    __m256i lo = _mm256_and_si256(v, mask);
                    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                    __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo),
                                                 _mm256_maddubs_epi16(hi, xhi));
                    d[t][h] = _mm256_add_epi32(d[t][h], _mm256_madd_epi16(p, ones));
                }
            }
        }
        __m256i xg = _mm256_set1_epi32(xgsum[gi]);
#pragma GCC unroll 2
        for (int t = 0; t < RT; t++)
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
                const int64_t o = t * sstride + 16 * gi + 8 * h;
                __m256i zv = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(zp + o)));
                __m256i dd = _mm256_sub_epi32(d[t][h], _mm256_mullo_epi32(zv, xg));
                acc[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dd), _mm256_loadu_ps(s + o), acc[t][h]);
            }
    }
#pragma GCC unroll 2
    for (int t = 0; t < RT; t++) {
        _mm256_storeu_ps(out + 16 * t, acc[t][0]);
        _mm256_storeu_ps(out + 16 * t + 8, acc[t][1]);
    }
}

__attribute__((target("avx2,fma"))) static void int4_gemv_avx2(
    const uint8_t *w, int64_t tstride, const float *s, const uint8_t *zp, int64_t sstride,
    const int8_t *x, const int32_t *xgsum, int64_t G, int64_t cpg, int rt, float *out) {
    if (rt >= 2) int4_gemv_avx2_impl(w, tstride, s, zp, sstride, x, xgsum, G, cpg, 2, out);
    else int4_gemv_avx2_impl(w, tstride, s, zp, sstride, x, xgsum, G, cpg, 1, out);
}
#endif

static void int4_tile_c(const uint8_t *w, const float *s, const uint8_t *zp, const int8_t **x,
                        const int32_t **xgsum, int64_t G, int64_t cpg, int nb, float *out) {
    for (int b = 0; b < nb; b++) {
        for (int r = 0; r < 16; r++) {
            float acc = 0.0f;
            for (int64_t gi = 0; gi < G; gi++) {
                int32_t dot = 0;
                for (int64_t kk = 0; kk < cpg; kk++) {
                    int64_t k = gi * cpg + kk;
                    const uint8_t *wk = w + 64 * k + 4 * r;
                    const int8_t *xk = x[b] + 8 * k;
                    for (int j = 0; j < 4; j++)
                        dot += (int32_t)(wk[j] & 15) * xk[j] + (int32_t)(wk[j] >> 4) * xk[4 + j];
                }
                dot -= (int32_t)zp[16 * gi + r] * xgsum[b][gi];
                acc += (float)dot * s[16 * gi + r];
            }
            out[16 * b + r] = acc;
        }
    }
}

/* y[b, o] = x_scale[b] * sum_g s[o, g] * (sum_{i in g} c[o, i] x[b, i] - zp[o, g] * sum_{i in g} x[b, i])
 *           + bias[o]
 * w: tile16 codes, s / zp: [ceil(O/16)][G][16] (G = I / g groups a row), x: [B][I] int8. */
int qd_int4_gemm(const uint8_t *w, const float *s, const uint8_t *zp, const int8_t *x,
                 const float *x_scale, const float *bias, float *y, int64_t B, int64_t O,
                 int64_t I, int64_t g, int level) {
    int64_t G = I / g, cpg = g / 8, T = (O + 15) / 16;
    int path = pick(level);
    int nb_max = path == 2 ? NB4 : NB; /* batch rows a pass */
    if (B <= 0 || O <= 0) return 0;
    int32_t *xgsum = (int32_t *)malloc((size_t)(B * G) * sizeof(int32_t));
    if (!xgsum) return -1; /* y untouched: the caller raises MemoryError */
    for (int64_t r = 0; r < B; r++)
        for (int64_t gi = 0; gi < G; gi++) {
            int32_t sum = 0;
            for (int64_t i = 0; i < g; i++) sum += x[r * I + gi * g + i];
            xgsum[r * G + gi] = sum;
        }
#ifdef __x86_64__
    if (path && B == 1) { /* GEMV: rt_max tiles a pass */
        const int64_t rt_max = path == 2 ? INT4_GEMV_TILES : INT4_GEMV_TILES_AVX2;
        int64_t n_units = (T + rt_max - 1) / rt_max;
#pragma omp parallel for schedule(static) if (O * I >= PARALLEL_MIN_WORK)
        for (int64_t u = 0; u < n_units; u++) {
            int64_t t0 = u * rt_max;
            int rt = T - t0 < rt_max ? (int)(T - t0) : (int)rt_max;
            float out[INT4_GEMV_TILES * 16];
            const uint8_t *wu = w + t0 * (I / 8) * 64;
            if (path == 2)
                int4_gemv_vnni(wu, (I / 8) * 64, s + t0 * G * 16, zp + t0 * G * 16, G * 16, x,
                               xgsum, G, cpg, rt, out);
            else
                int4_gemv_avx2(wu, (I / 8) * 64, s + t0 * G * 16, zp + t0 * G * 16, G * 16, x,
                               xgsum, G, cpg, rt, out);
            int64_t rows = O - 16 * t0 < 16 * rt ? O - 16 * t0 : 16 * rt;
            float *yr = y + 16 * t0;
            for (int64_t r = 0; r < rows; r++)
                yr[r] = out[r] * x_scale[0] + (bias ? bias[16 * t0 + r] : 0.0f);
        }
        free(xgsum);
        return 0;
    }
#endif
#ifdef __x86_64__
    if (path == 2 && T >= 2) { /* GEMM: 2 tiles x up to NB4 batch rows a pass */
        int64_t n_units = (T + 1) / 2;
#pragma omp parallel for schedule(static) if (B * O * I >= PARALLEL_MIN_WORK)
        for (int64_t u = 0; u < n_units; u++) {
            int64_t t0 = 2 * u;
            int rt = T - t0 < 2 ? 1 : 2;
            const uint8_t *wt = w + t0 * (I / 8) * 64;
            float out[2 * NB4 * 16];
            for (int64_t b0 = 0; b0 < B; b0 += NB4) {
                int nb = B - b0 < NB4 ? (int)(B - b0) : NB4;
                const int8_t *xs[NB4];
                const int32_t *gs[NB4];
                for (int b = 0; b < NB4; b++) {
                    int64_t r = b0 + (b < nb ? b : 0);
                    xs[b] = x + r * I;
                    gs[b] = xgsum + r * G;
                }
                if (rt == 2)
                    int4_tile2_vnni(wt, (I / 8) * 64, s + t0 * G * 16, zp + t0 * G * 16, G * 16, xs,
                                    gs, G, cpg, nb, out);
                else
                    int4_tile_vnni(wt, s + t0 * G * 16, zp + t0 * G * 16, xs, gs, G, cpg, nb, out);
                for (int t = 0; t < rt; t++) {
                    int64_t o0 = 16 * (t0 + t);
                    int rows = O - o0 < 16 ? (int)(O - o0) : 16;
                    for (int b = 0; b < nb; b++) {
                        float xs_b = x_scale[b0 + b];
                        float *yr = y + (b0 + b) * O + o0;
                        const float *ob = out + (t * NB4 + b) * 16;
                        for (int r = 0; r < rows; r++)
                            yr[r] = ob[r] * xs_b + (bias ? bias[o0 + r] : 0.0f);
                    }
                }
            }
        }
        free(xgsum);
        return 0;
    }
#endif
#pragma omp parallel for schedule(static) if (B * O * I >= PARALLEL_MIN_WORK)
    for (int64_t t = 0; t < T; t++) {
        const uint8_t *wt = w + t * (I / 8) * 64;
        const float *st = s + t * G * 16;
        const uint8_t *zt = zp + t * G * 16;
        int rows = O - 16 * t < 16 ? (int)(O - 16 * t) : 16;
        float out[NB4 * 16];
        for (int64_t b0 = 0; b0 < B; b0 += nb_max) {
            int nb = B - b0 < nb_max ? (int)(B - b0) : nb_max;
            const int8_t *xs[NB4];
            const int32_t *gs[NB4];
            for (int b = 0; b < NB4; b++) {
                int64_t r = b0 + (b < nb ? b : 0);
                xs[b] = x + r * I;
                gs[b] = xgsum + r * G;
            }
#ifdef __x86_64__
            if (path == 2)
                int4_tile_vnni(wt, st, zt, xs, gs, G, cpg, nb, out);
            else if (path == 1)
                int4_tile_avx2(wt, st, zt, xs, gs, G, cpg, nb, out);
            else
#endif
                int4_tile_c(wt, st, zt, xs, gs, G, cpg, nb, out);
            for (int b = 0; b < nb; b++) {
                float xs_b = x_scale[b0 + b];
                float *yr = y + (b0 + b) * O + 16 * t;
                for (int r = 0; r < rows; r++)
                    yr[r] = out[16 * b + r] * xs_b + (bias ? bias[16 * t + r] : 0.0f);
            }
        }
    }
    free(xgsum);
    return 0;
}

/* ------------------------------------------------------------------------------------------
 * W8A8 (and W1.58A8 / W2A8, see tern_expand) with AMX (Intel Advanced Matrix Extensions:
 * Sapphire Rapids and later), many rows (#15 item 2, helper amx). tdpbssd multiplies a 16 x 64 int8 tile of activations by a
 * 64 x 16 int8 tile of weights into a 16 x 16 int32 tile (s8 x s8: no u8 flip, no wsum), one
 * instruction per 16K multiply-adds. The weights are repacked once, at plan time, into the
 * B-tile layout (qd_amx_pack_int8): output rows in pairs of 16-row tiles, inputs in steps of
 * 64; block (p, k) is 2 KB, tile t of it holds byte 64 r + 4 c + j = w[32 p + 16 t + c]
 * [64 k + 4 r + j] (zero past O and I), so a pair's panel is one contiguous stream. A block of
 * 2 x 2 C tiles (32 batch rows x 32 outputs; tmm0-3) loads per 64-input step one or two A
 * tiles (tmm4-5: 16 batch rows each, the per-token int8 codes, rows padded to 16 with zeros,
 * inputs to 64, copied per call into contiguous 1 KB tiles) and two B tiles (tmm6-7) and
 * issues 2-4 tdpbssd. The epilogue is vectorized (AVX-512). Threads take pairs of output
 * tiles; a pair's panel (2 KB per 64 inputs: 128 KB at 4096) stays in L2 while the batch
 * blocks pass over it. The int32 dots are exact, so the results equal the VNNI kernel's bit
 * for bit (same epilogue: dot * x_scale * w_scale + bias, in that order).
 * Linux only: a process must ask for the tile data state once (arch_prctl ARCH_REQ_XCOMP_PERM,
 * XFEATURE_XTILEDATA = 18); where that fails, CPUID lacks AMX-TILE / AMX-INT8 / palette 1 of
 * 8 tiles x 16 rows x 64 bytes, or the compiler is too old for the instructions, there is no
 * AMX and the VNNI / AVX2 / C paths run. The instructions are inline asm (GCC >= 11 / clang
 * >= 12 and binutils >= 2.36 know them), so the rest of the file builds for plain x86-64.
 * ------------------------------------------------------------------------------------------ */
#if defined(__x86_64__) && defined(__linux__) && \
    (defined(__clang__) ? __clang_major__ >= 12 : __GNUC__ >= 11)
#define QD_AMX 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

/* From this many rows on, W8A8 runs the AMX GEMM (where the plan has its weights), and from
 * AMX_MIN_ROWS_SMALL rows for layers of at most AMX_SMALL_WEIGHTS weights (L2-resident, where
 * the VNNI GEMM is compute-bound). 1 thread, interleaved against the VNNI kernel on the
 * Sapphire Rapids VM (benchmarks/amx_ab.py): MiniLM shapes (384x384, 1536x384, 384x1536) AMX
 * 1.2-2.3x at 3-4 rows, 1.5-6x at 8-64; 1024x4096 and 4096x4096 (both paths stream the
 * weights) VNNI 1.1-1.5x faster at 2-4 rows, AMX 1.1-1.5x at 8, 1.3-2.2x at 16-64; at 1 row
 * the VNNI GEMV wins everywhere (software prefetch of the B tiles: no difference) */
#define AMX_MIN_ROWS 8
#define AMX_MIN_ROWS_SMALL 3
#define AMX_SMALL_WEIGHTS (1 << 21)
/* W1.58A8 / W2A8 (codes expanded per call): from this many rows (1 thread, interleaved
 * against the VNNI ternary GEMM: AMX 1.06-1.7x at 16 rows, 1.2-1.6x at 32, 1.3-2.6x at 64 on
 * MiniLM shapes, 1024x4096 and 4096x4096; at 4-8 rows 0.5-1.3x) */
#define TERN_AMX_MIN_ROWS 16
/* W4A8 (codes expanded per call, int32 dots stored per group): from this many rows */
#define INT4_AMX_MIN_ROWS 16
#define AMX_KSTEP 64   /* inputs a step (one A tile row, 16 rows of a B tile x 4) */
#define AMX_PAIR 32    /* output rows a block (two B tiles) */
/* bytes ahead of the B-tile stream prefetched into L1 (two 64-input steps). tileloadd reads a
 * 1 KB tile as 16 lines and the TMUL waits for all of them: without a software prefetch the
 * tile loads of a stream from memory do not overlap the dot products, and 8-32 rows of a
 * 4096x4096 W8A8 layer ran at ~12 GB/s; with it 1.2-1.5x faster, cold (4096 and 8192 bytes
 * ahead equal; 16384 no better) */
#define AMX_PREFETCH 4096
#ifndef AMX_CODES_PREFETCH
#define AMX_CODES_PREFETCH 1024 /* the same for the 2- and 4-bit codes a call expands into B tiles */
#endif


#ifdef QD_AMX
/* One activation row quantized straight into its slots of the AMX A tiles (issue #15, helper
 * a8rows): the ops of quantize_row_avx512 in its order (scale from max |x|, x * (1 / scale),
 * round half to even, clamp to +-127), so the codes are the same bit for bit, but each
 * 64-input step's 64 codes go to dst + 1024 k (row r of a 16-row A tile is 64 bytes at 64 r;
 * the caller passes the row's slot in step 0), zero past I up to 64 KS inputs. This replaces
 * quantizing into a row-major buffer and copying 64-byte pieces into the tiles, and runs
 * inside the GEMM's parallel region (rows split over the threads). The max pass keeps two
 * chains (max is exact in any order). A row holding NaN or Inf gets zero codes and a NaN
 * scale and returns 1, as quantize_row_avx512. */
__attribute__((target("avx512f,avx512bw,avx512vl"))) static int
amx_quantize_row(const float *xr, int8_t *dst, float *scale, int64_t I, int64_t KS, float eps) {
    const __m512 big = _mm512_set1_ps(FLT_MAX);
    __m512 m0 = _mm512_setzero_ps(), m1 = _mm512_setzero_ps();
    __mmask16 bad = 0;
    int64_t i = 0;
    for (; i + 32 <= I; i += 32) {
        __m512 a = _mm512_abs_ps(_mm512_loadu_ps(xr + i));
        __m512 b = _mm512_abs_ps(_mm512_loadu_ps(xr + i + 16));
        bad |= _mm512_cmp_ps_mask(a, big, _CMP_NLE_UQ) | _mm512_cmp_ps_mask(b, big, _CMP_NLE_UQ);
        m0 = _mm512_max_ps(m0, a);
        m1 = _mm512_max_ps(m1, b);
    }
    for (; i < I; i += 16) { /* masked tail: absent lanes read as 0 */
        __mmask16 k = I - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (I - i)) - 1u);
        __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(k, xr + i));
        bad |= _mm512_cmp_ps_mask(a, big, _CMP_NLE_UQ);
        m0 = _mm512_max_ps(m0, a);
    }
    if (bad) {
        for (int64_t k = 0; k < KS; k++) memset(dst + 1024 * k, 0, 64);
        *scale = NAN;
        return 1;
    }
    float s = row_scale(_mm512_reduce_max_ps(_mm512_max_ps(m0, m1)), eps);
    const __m512 vinv = _mm512_set1_ps(1.0f / s);
    const __m512 hi = _mm512_set1_ps(127.0f), lo = _mm512_set1_ps(-127.0f);
    for (int64_t k = 0; k < KS; k++)
        for (int j = 0; j < 4; j++) {
            int64_t i0 = 64 * k + 16 * j;
            __mmask16 m = I - i0 >= 16 ? (__mmask16)0xFFFF
                          : I > i0     ? (__mmask16)((1u << (I - i0)) - 1u)
                                       : (__mmask16)0;
            __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, xr + i0), vinv);
            v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            __m512i q = _mm512_cvtps_epi32(_mm512_min_ps(hi, _mm512_max_ps(lo, v)));
            _mm_storeu_si128((__m128i *)(dst + 1024 * k + 16 * j), _mm512_cvtsepi32_epi8(q));
        }
    *scale = s;
    return 0;
}

/* Row r of a batch of B rows into its slots of the contiguous A tiles xa (1 KB each: block of 16
 * rows mb, step k at (mb KS + k) KB; row r % 16 of each tile): quantized by amx_quantize_row, or
 * zeros for the last tile's absent rows (B <= r < B rounded up to 16). Returns as
 * amx_quantize_row (0 for an absent row). */
__attribute__((target("avx512f,avx512bw,avx512vl"))) static int
amx_quantize_slot(const float *x, int8_t *xa, float *x_scale, int64_t r, int64_t B, int64_t I,
                  int64_t KS, float eps) {
    int8_t *dst = xa + (r / 16 * KS * 16 + r % 16) * 64;
    if (r < B) return amx_quantize_row(x + r * I, dst, x_scale + r, I, KS, eps);
    for (int64_t k = 0; k < KS; k++) memset(dst + 1024 * k, 0, 64);
    return 0;
}
#endif

int64_t qd_amx_int8_bytes(int64_t O, int64_t I) {
    return ((O + AMX_PAIR - 1) / AMX_PAIR) * AMX_PAIR * ((I + AMX_KSTEP - 1) / AMX_KSTEP) *
           AMX_KSTEP;
}

/* w [O][I] int8 (row layout) -> out (qd_amx_int8_bytes(O, I) bytes) in the B-tile layout */
void qd_amx_pack_int8(const int8_t *w, int64_t O, int64_t I, int8_t *out) {
    int64_t KS = (I + AMX_KSTEP - 1) / AMX_KSTEP, NP = (O + AMX_PAIR - 1) / AMX_PAIR;
#pragma omp parallel for schedule(static) if (O * I >= PARALLEL_MIN_WORK)
    for (int64_t p = 0; p < NP; p++)
        for (int64_t k = 0; k < KS; k++) {
            int8_t *blk = out + (p * KS + k) * 2048;
            for (int t = 0; t < 2; t++)
                for (int r = 0; r < 16; r++)
                    for (int c = 0; c < 16; c++)
                        for (int j = 0; j < 4; j++) {
                            int64_t o = AMX_PAIR * p + 16 * t + c, i = AMX_KSTEP * k + 4 * r + j;
                            blk[1024 * t + 64 * r + 4 * c + j] = o < O && i < I ? w[o * I + i] : 0;
                        }
        }
}

/* ------------------------------------------------------------------------------------------
 * W8A8 from the B-tile layout alone (#15, helper amxone): one copy of the int8 codes on AMX
 * CPUs. An AMX plan keeps only qd_amx_pack_int8's layout; the rows below the AMX cut-over read
 * it too. Its 64-byte line r of tile t of block (p, k) holds outputs 32 p + 16 t + c (c < 16)
 * x inputs 64 k + 4 r + j (j < 4) at byte 4 c + j: exactly one dpbusd operand against the
 * activations' 4 bytes 64 k + 4 r .. + 3 broadcast to the 16 lanes, whose lane c is then
 * output c's partial dot (no horizontal sums). A pair's panel is one contiguous stream, so at
 * one row this streams the same bytes as the row-layout GEMV (plus the padding to 32 outputs
 * and 64 inputs). The activations are the u8 codes x ^ 0x80 (rows zero-padded to 64 k: the
 * padded weights are 0), corrected by 128 * wsum as in i8_vnni_impl; the integer dots are
 * exact and the epilogue is epilogue(), so the outputs equal the row-layout kernels' bit for
 * bit. The forced portable / AVX2 levels (tests) take the plain C reader int8_tiles_c.
 * ------------------------------------------------------------------------------------------ */

/* The dots of batch rows [0, B) (signed codes, row stride xs) with pair p's 32 outputs */
static void int8_tiles_c(const int8_t *wp, const int8_t *x, int64_t xs, int64_t B, int64_t KS,
                         int64_t p, int cols, const float *x_scale, const float *w_scale,
                         const float *bias, float *y, int64_t O) {
    int64_t o0 = p * AMX_PAIR;
    for (int64_t b = 0; b < B; b++) {
        int32_t dot[AMX_PAIR] = {0};
        const int8_t *xb = x + b * xs;
        for (int64_t k = 0; k < KS; k++) {
            const int8_t *blk = wp + (p * KS + k) * 2048, *xk = xb + AMX_KSTEP * k;
            for (int t = 0; t < 2; t++)
                for (int r = 0; r < 16; r++)
                    for (int c = 0; c < 16; c++)
                        for (int j = 0; j < 4; j++)
                            dot[16 * t + c] += (int32_t)blk[1024 * t + 64 * r + 4 * c + j] *
                                               xk[4 * r + j];
        }
        for (int c = 0; c < cols; c++)
            y[b * O + o0 + c] = epilogue(dot[c], x_scale[b], w_scale[o0 + c], bias, o0 + c);
    }
}

#ifdef __x86_64__
#ifndef I8T_PF
#define I8T_PF 4096
#endif
/* One 2 KB block k of a pair's panel x BB batch rows into the accumulators a[b][t] */
__attribute__((always_inline, target("avx512f,avx512bw,avx512vnni"))) static inline void
i8t_step(const int8_t *wp, const int8_t *x, int64_t xs, int64_t k, const int BB, __m512i *a) {
    const int8_t *blk = wp + k * 2048, *xk = x + AMX_KSTEP * k;
#pragma GCC unroll 16
    for (int r = 0; r < 16; r++) {
        if (I8T_PF) { /* each stream is sequential: prefetch I8T_PF bytes ahead */
            _mm_prefetch((const char *)(blk + I8T_PF + 64 * r), _MM_HINT_T0);
            _mm_prefetch((const char *)(blk + I8T_PF + 1024 + 64 * r), _MM_HINT_T0);
        }
        __m512i w0 = _mm512_loadu_si512((const void *)(blk + 64 * r));
        __m512i w1 = _mm512_loadu_si512((const void *)(blk + 1024 + 64 * r));
#pragma GCC unroll 8
        for (int b = 0; b < BB; b++) {
            __m512i xv = _mm512_set1_epi32(load_i32(xk + b * xs + 4 * r));
            DPBUSD(a[2 * b], xv, w0);
            DPBUSD(a[2 * b + 1], xv, w1);
        }
    }
}

/* BB batch rows (u8 codes, row stride xs) x one pair's panel wp (cols of its 32 outputs real):
 * per line 2 weight loads (one per tile) feed BB broadcasts x 2 dpbusd. The panel's KS blocks
 * are read as NS streams (NS contiguous ranges at once, own accumulators, summed at the end):
 * more lines in flight from memory at few rows, as the row-layout GEMV's 8 rows a pass. */
__attribute__((always_inline, target("avx512f,avx512bw,avx512vnni"))) static inline void
i8t_vnni_impl(const int8_t *wp, const int8_t *x, int64_t xs, int64_t KS, const int BB,
              const int NS, int cols, int64_t o0, const int32_t *wsum, const float *x_scale,
              const float *w_scale, const float *bias, float *y, int64_t O) {
    __m512i acc[4][16];
#pragma GCC unroll 4
    for (int s = 0; s < NS; s++)
#pragma GCC unroll 16
        for (int j = 0; j < 2 * BB; j++) acc[s][j] = _mm512_setzero_si512();
    int64_t kq = KS / NS;
    for (int64_t kk = 0; kk < kq; kk++)
#pragma GCC unroll 4
        for (int s = 0; s < NS; s++) i8t_step(wp, x, xs, s * kq + kk, BB, acc[s]);
    for (int64_t k = NS * kq; k < KS; k++) i8t_step(wp, x, xs, k, BB, acc[0]);
    for (int b = 0; b < BB; b++) {
        int32_t dot[AMX_PAIR];
        for (int t = 0; t < 2; t++) {
            __m512i a = acc[0][2 * b + t];
            for (int s = 1; s < NS; s++) a = _mm512_add_epi32(a, acc[s][2 * b + t]);
            _mm512_storeu_si512((void *)(dot + 16 * t), a);
        }
        for (int c = 0; c < cols; c++) {
            int64_t o = o0 + c;
            y[b * O + o] = epilogue(dot[c] - 128 * wsum[o], x_scale[b], w_scale[o], bias, o);
        }
    }
}

/* Streams a panel at 1-4 rows (5-8: 1, the accumulators fill the registers). 4096x4096, cold
 * weights, 1 thread, against the row-layout kernels (benchmarks/one_copy_ab.py): 1 stream
 * without prefetch 0.74-0.99x at 1-4 rows, with it (4 KB ahead) 0.89-0.95x; 2 streams 1.00-1.05x,
 * 4 at 1-2 rows 0.96-1.07x (one run each, loaded machine, +-5%; kernels-amx.md). */
#ifndef I8T_NS
#define I8T_NS 2
#endif
VNNI_TARGET static void i8t_block_vnni(const int8_t *wp, const int8_t *x, int64_t xs,
                                       int64_t KS, int bb, int cols, int64_t o0,
                                       const int32_t *wsum, const float *x_scale,
                                       const float *w_scale, const float *bias, float *y,
                                       int64_t O) {
#define I8T(N, S) i8t_vnni_impl(wp, x, xs, KS, N, S, cols, o0, wsum, x_scale, w_scale, bias, y, O)
    switch (bb) {
    case 1: I8T(1, I8T_NS); break;
    case 2: I8T(2, I8T_NS); break;
    case 3: I8T(3, I8T_NS); break;
    case 4: I8T(4, I8T_NS); break;
    case 5: I8T(5, 1); break;
    case 6: I8T(6, 1); break;
    case 7: I8T(7, 1); break;
    default: I8T(8, 1);
    }
#undef I8T
}
#endif

/* y [B][O] = per-token int8 (x [B][I]) x the int8 weights in the B-tile layout (wp) with
 * their row sums (wsum), scales and bias: quantized as qd_a8_linear does (rows zero-padded to
 * 64 k), then the VNNI reader (level 0 with VNNI) or the C reader, threads over the pairs of
 * 16-output tiles, every batch row within a thread's pair (the panel is read from memory once
 * and from cache by later blocks of 8 rows). Returns as qd_a8_linear. */
static int64_t int8_tiles_linear(const int8_t *wp, const int32_t *wsum, const float *w_scale,
                                 const float *bias, int64_t O, int64_t I, float eps,
                                 const float *x, float *y, int64_t B, int level) {
    int64_t KS = (I + AMX_KSTEP - 1) / AMX_KSTEP, xs = KS * AMX_KSTEP;
    int64_t NP = (O + AMX_PAIR - 1) / AMX_PAIR;
    char *buf = (char *)malloc((size_t)B * (8 + (size_t)xs));
    if (!buf) return -1;
    float *x_scale = (float *)buf;
    int32_t *rowsum = (int32_t *)(buf + 4 * B);
    int8_t *xq = (int8_t *)(buf + 8 * B);
    int64_t status = qd_quantize_rows(x, xq, x_scale, rowsum, B, I, xs, eps, level);
    int vnni = pick(level) == 2;
    (void)wsum;
    if (status == 0 && vnni)
        for (int64_t i = 0; i < B * xs; i++) xq[i] = (int8_t)((uint8_t)xq[i] ^ 0x80u);
    if (status == 0) {
#pragma omp parallel for schedule(static) if (B * O * I >= PARALLEL_MIN_WORK)
        for (int64_t p = 0; p < NP; p++) {
            int64_t o0 = p * AMX_PAIR;
            int cols = O - o0 < AMX_PAIR ? (int)(O - o0) : AMX_PAIR;
#ifdef __x86_64__
            if (vnni) {
                for (int64_t b0 = 0; b0 < B; b0 += 8)
                    i8t_block_vnni(wp + p * KS * 2048, xq + b0 * xs, xs, KS,
                                   B - b0 < 8 ? (int)(B - b0) : 8, cols, o0, wsum, x_scale + b0,
                                   w_scale, bias, y + b0 * O, O);
                continue;
            }
#endif
            int8_tiles_c(wp, xq, xs, B, KS, p, cols, x_scale, w_scale, bias, y, O);
        }
    }
    free(buf);
    return status;
}

#ifdef QD_AMX
#define ARCH_GET_XCOMP_PERM 0x1022
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static int amx_probe(void) {
    unsigned a, b, c, d;
    if (__get_cpuid_max(0, NULL) < 0x1D) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    if (!((d >> 24) & 1) || !((d >> 25) & 1)) return 0; /* AMX-TILE, AMX-INT8 */
    __cpuid_count(0x1D, 0, a, b, c, d);                  /* palettes */
    if (a < 1) return 0;
    __cpuid_count(0x1D, 1, a, b, c, d); /* palette 1: bytes a row, tiles, rows */
    if ((b & 0xFFFF) < 64 || (b >> 16) < 8 || (c & 0xFFFF) < 16) return 0;
    unsigned long perm = 0;
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) return 0;
    if (syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &perm) != 0) return 0;
    return (perm >> XFEATURE_XTILEDATA) & 1;
}

static int has_amx(void) {
    static int cached = -1; /* the probe is idempotent: a race only repeats it */
    int v = __atomic_load_n(&cached, __ATOMIC_ACQUIRE);
    if (v < 0) {
        v = amx_probe();
        __atomic_store_n(&cached, v, __ATOMIC_RELEASE);
    }
    return v;
}

/* ldtilecfg's 64-byte operand: palette 1, every one of the 8 tiles 16 rows x 64 bytes */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_cfg;

#define TILE_LOAD(t, p, s) \
    __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #t ::"r"(p), "r"((int64_t)(s)) : "memory")
#define TILE_STORE(t, p, s) \
    __asm__ volatile("tilestored %%tmm" #t ", (%0,%1,1)" ::"r"(p), "r"((int64_t)(s)) : "memory")
#define TILE_DP(c, a, b) __asm__ volatile("tdpbssd %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::)
#define TILE_ZERO(t) __asm__ volatile("tilezero %%tmm" #t ::)

static void amx_begin(void) {
    amx_cfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    __asm__ volatile("ldtilecfg %0" ::"m"(cfg));
}

static void amx_end(void) { __asm__ volatile("tilerelease" ::); }

/* c [32][32] int32 = 16 mt activation rows (x: the A tiles of one or two blocks of 16 rows,
 * KS contiguous 1 KB tiles each, the second block xstride bytes after the first) times the pair
 * panel wp (KS blocks of 2 KB); stream: wp comes from memory (the plan's weights, not a panel
 * expanded into L1/L2 by this call), so it is prefetched AMX_PREFETCH bytes ahead */
static void amx_pair(const int8_t *wp, const int8_t *x, int64_t KS, int64_t xstride, int mt,
                     int stream, int32_t *c) {
    TILE_ZERO(0);
    TILE_ZERO(1);
    if (mt == 2) {
        TILE_ZERO(2);
        TILE_ZERO(3);
        const int8_t *x1 = x + xstride;
        for (int64_t k = 0; k < KS; k++) {
            const int8_t *wk = wp + k * 2048;
            if (stream)
                for (int l = 0; l < 2048; l += 64)
                    _mm_prefetch((const char *)wk + AMX_PREFETCH + l, _MM_HINT_T0);
            TILE_LOAD(6, wk, 64);
            TILE_LOAD(7, wk + 1024, 64);
            TILE_LOAD(4, x + k * 1024, 64);
            TILE_LOAD(5, x1 + k * 1024, 64);
            TILE_DP(0, 4, 6);
            TILE_DP(1, 4, 7);
            TILE_DP(2, 5, 6);
            TILE_DP(3, 5, 7);
        }
        TILE_STORE(2, c + 16 * 32, 128);
        TILE_STORE(3, c + 16 * 32 + 16, 128);
    } else {
        for (int64_t k = 0; k < KS; k++) {
            const int8_t *wk = wp + k * 2048;
            if (stream)
                for (int l = 0; l < 2048; l += 64)
                    _mm_prefetch((const char *)wk + AMX_PREFETCH + l, _MM_HINT_T0);
            TILE_LOAD(6, wk, 64);
            TILE_LOAD(7, wk + 1024, 64);
            TILE_LOAD(4, x + k * 1024, 64);
            TILE_DP(0, 4, 6);
            TILE_DP(1, 4, 7);
        }
    }
    TILE_STORE(0, c, 128);
    TILE_STORE(1, c + 16, 128);
}

/* y[b][n] = (float)c[b][n] * xs[b] * ws[n] + bias[n] for b < rows, n < cols (c: [32][32]),
 * the ops of epilogue() in its order, 16 outputs a vector (every AMX CPU has AVX-512) */
__attribute__((target("avx512f"))) static void amx_epilogue(const int32_t *c, int rows, int cols,
                                                           const float *xs, const float *ws,
                                                           const float *bias, float *y,
                                                           int64_t O) {
    for (int n = 0; n < cols; n += 16) {
        __mmask16 m = cols - n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (cols - n)) - 1);
        __m512 wv = _mm512_maskz_loadu_ps(m, ws + n);
        __m512 bv = bias ? _mm512_maskz_loadu_ps(m, bias + n) : _mm512_setzero_ps();
        for (int b = 0; b < rows; b++) {
            __m512 v = _mm512_cvtepi32_ps(_mm512_loadu_si512((const void *)(c + 32 * b + n)));
            v = _mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(xs[b])), wv);
            _mm512_mask_storeu_ps(y + b * O + n, m, _mm512_add_ps(v, bv));
        }
    }
}

/* W1.58A8 / W2A8 (optional item 3): the B tiles of one pair made from the 2-bit codes of the
 * tile16x16 layout (see the ternary section) once per call, into a per-thread panel that the
 * batch blocks then share. A 64-byte chunk (16 inputs) of a tile gives four B-tile rows, row
 * 4 q + p of step k being ((chunk 4 k + q) >> 2 p) & 3 minus the row's zero point in every
 * byte: lane c of the chunk holds row c's codes, exactly the B tile's 4 bytes of column c.
 * Weights are c - zp in [-3, 3]: the int32 dots equal the VNNI kernel's sum c q - zp sum q. */
__attribute__((target("avx512f,avx512bw"))) static void
tern_expand(const uint8_t *w, int64_t tstride, int64_t nk, const int32_t *zp, int64_t o0,
            int64_t O, int64_t KS, int8_t *panel) {
    const __m512i three = _mm512_set1_epi8(3);
    for (int t = 0; t < 2; t++) {
        int64_t r0 = o0 + 16 * t; /* first output row of this tile */
        __m512i zv = _mm512_setzero_si512();
        if (r0 < O) {
            __mmask16 m = O - r0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (O - r0)) - 1);
            zv = zp ? _mm512_maskz_loadu_epi32(m, zp + r0) : _mm512_maskz_set1_epi32(m, 1);
            zv = _mm512_mullo_epi32(zv, _mm512_set1_epi32(0x01010101));
        }
        const uint8_t *wt = w + t * tstride;
        for (int64_t k = 0; k < KS; k++) {
            int8_t *dst = panel + k * 2048 + t * 1024;
            for (int q = 0; q < 4; q++) {
                int64_t kk = 4 * k + q;
                if (r0 >= O || kk >= nk) { /* no such tile / past I_pad: zero weights */
                    memset(dst + 256 * q, 0, 256);
                    continue;
                }
                _mm_prefetch((const char *)wt + kk * 64 + AMX_CODES_PREFETCH, _MM_HINT_T0);
                __m512i v = _mm512_loadu_si512((const void *)(wt + kk * 64));
                for (int p = 0; p < 4; p++) {
                    __m512i c = _mm512_and_si512(_mm512_srli_epi16(v, 2 * p), three);
                    _mm512_storeu_si512((void *)(dst + 256 * q + 64 * p), _mm512_sub_epi8(c, zv));
                }
            }
        }
    }
}

/* y [B][O] = per-token int8 (x) x wp (qd_amx_pack_int8 of the int8 weights) with the VNNI
 * kernel's epilogue; tw non-NULL: the weights are the 2-bit tile16x16 codes tw (I_pad inputs,
 * zero points zp or 1) expanded per pair instead (wp unused). Returns as qd_a8_linear: 0, the
 * count of NaN / Inf rows, or -1. */
static int64_t int8_amx_linear(const int8_t *wp, const float *w_scale, const float *bias,
                               int64_t O, int64_t I, float eps, const float *x, float *y,
                               int64_t B, int level, const uint8_t *tw, const int32_t *zp,
                               int64_t I_pad) {
    if (B <= 0 || O <= 0) return 0;
    (void)level; /* every AMX CPU has AVX-512: the codes are quantize_row_avx512's */
    int64_t KS = (I + AMX_KSTEP - 1) / AMX_KSTEP;
    int64_t Bp = (B + 15) / 16 * 16, NP = (O + AMX_PAIR - 1) / AMX_PAIR;
    char *buf = (char *)malloc((size_t)B * 4 + (size_t)Bp * (size_t)KS * AMX_KSTEP);
    if (!buf) return -1;
    float *x_scale = (float *)buf;
    /* the A tiles, contiguous (amx_quantize_slot's layout) instead of 16 rows ldx apart
     * (1.0-1.17x at 8-64 rows, helper amx); each row is quantized straight into its slots by
     * amx_quantize_slot, the rows split over the threads of the GEMM's own
     * parallel region (helper a8rows: was one thread quantizing into a row buffer, then copying
     * it into the tiles, before the region) */
    int8_t *xa = (int8_t *)(buf + 4 * B);
    int failed = 0;
    int64_t bad = 0;
#pragma omp parallel if (B * O * I >= PARALLEL_MIN_WORK) reduction(| : failed)
    {
#pragma omp for schedule(static) reduction(+ : bad)
        for (int64_t r = 0; r < Bp; r++) bad += amx_quantize_slot(x, xa, x_scale, r, B, I, KS, eps);
        /* the for's barrier: every row is quantized and bad is final */
        if (!bad) {
            int32_t c[32 * 32];
            int8_t *panel = tw ? (int8_t *)malloc((size_t)KS * 2048) : NULL;
            failed = tw && !panel;
            if (!failed) amx_begin();
#pragma omp for schedule(static)
            for (int64_t p = 0; p < NP; p++) {
                if (failed) continue;
                int64_t o0 = p * AMX_PAIR;
                int cols = O - o0 < AMX_PAIR ? (int)(O - o0) : AMX_PAIR;
                const int8_t *wpp = wp ? wp + p * KS * 2048 : panel;
                if (tw)
                    tern_expand(tw + 2 * p * 64 * (I_pad / 16), 64 * (I_pad / 16), I_pad / 16,
                                zp, o0, O, KS, panel);
                for (int64_t b0 = 0; b0 < B; b0 += 32) {
                    int rows = B - b0 < 32 ? (int)(B - b0) : 32;
                    amx_pair(wpp, xa + b0 / 16 * KS * 1024, KS, KS * 1024, rows > 16 ? 2 : 1,
                             wp != NULL && b0 == 0, c);
                    amx_epilogue(c, rows, cols, x_scale + b0, w_scale + o0,
                                 bias ? bias + o0 : NULL, y + b0 * O + o0, O);
                }
            }
            if (panel || !tw) amx_end();
            free(panel);
        }
    }
    free(buf);
    if (bad) return bad;
    return failed ? -1 : 0;
}

/* W4A8 with AMX (#15 brief item 2, helper a8rows). The 4-bit codes of one 16-output tile
 * (tile16 layout: chunk k, 64 bytes, holds inputs 8k..8k+7 of the tile's 16 rows, byte 4 r + j
 * = code[r][8k + j] | code[r][8k + 4 + j] << 4) become B tiles once per call, into a per-thread
 * panel laid out as qd_amx_pack_int8's: chunk 8 k + m of a 64-input step gives B-tile row 2 m
 * (its low nibbles: inputs 64 k + 8 m + j) and 2 m + 1 (high nibbles: 64 k + 8 m + 4 + j),
 * lane r of the chunk being column r, each byte minus its row's zero point of that step's
 * group (c - zp: the plan checks zp < 128, so it fits int8). The int32 dots of a group are then
 * sum (c - zp) q = sum c q - zp sum q, the VNNI kernel's dd, exactly. */
__attribute__((target("avx512f,avx512bw"))) static void
int4_expand(const uint8_t *wt, const uint8_t *zt, int64_t cpg, int64_t KS, int8_t *dst) {
    const __m512i mask = _mm512_set1_epi8(15);
    for (int64_t k = 0; k < KS; k++) {
        const uint8_t *zk = zt + 16 * (8 * k / cpg); /* the step's group */
        __m512i zv = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)zk));
        zv = _mm512_mullo_epi32(zv, _mm512_set1_epi32(0x01010101));
        int8_t *d = dst + 2048 * k;
        for (int m = 0; m < 8; m++) {
            _mm_prefetch((const char *)wt + 64 * (8 * k + m) + AMX_CODES_PREFETCH, _MM_HINT_T0);
            __m512i v = _mm512_loadu_si512((const void *)(wt + 64 * (8 * k + m)));
            __m512i lo = _mm512_and_si512(v, mask);
            __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
            _mm512_storeu_si512((void *)(d + 128 * m), _mm512_sub_epi8(lo, zv));
            _mm512_storeu_si512((void *)(d + 128 * m + 64), _mm512_sub_epi8(hi, zv));
        }
    }
}

/* acc [32][32] float (rows < 32, all 32 columns) += (float) c * s, s the pair's two 16-output
 * group scale vectors (s1 NULL: no second tile): the VNNI kernel's fmadd per group, in group
 * order, so the float sums are its sums bit for bit */
__attribute__((target("avx512f"))) static void int4_amx_fma(const int32_t *c, int rows,
                                                           const float *s0, const float *s1,
                                                           float *acc) {
    __m512 sv[2] = {_mm512_loadu_ps(s0), s1 ? _mm512_loadu_ps(s1) : _mm512_setzero_ps()};
    for (int b = 0; b < rows; b++)
        for (int h = 0; h < 2; h++) {
            __m512 v = _mm512_cvtepi32_ps(_mm512_loadu_si512((const void *)(c + 32 * b + 16 * h)));
            float *a = acc + 32 * b + 16 * h;
            _mm512_storeu_ps(a, _mm512_fmadd_ps(v, sv[h], _mm512_loadu_ps(a)));
        }
}

/* y[b][n] = acc[b][n] * xs[b] + bias[n] (+ 0.0f without one) for b < rows, n < cols: the
 * VNNI path's scalar epilogue, 16 outputs a vector */
__attribute__((target("avx512f"))) static void int4_amx_store(const float *acc, int rows,
                                                             int cols, const float *xs,
                                                             const float *bias, float *y,
                                                             int64_t O) {
    for (int n = 0; n < cols; n += 16) {
        __mmask16 m = cols - n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (cols - n)) - 1);
        __m512 bv = bias ? _mm512_maskz_loadu_ps(m, bias + n) : _mm512_setzero_ps();
        for (int b = 0; b < rows; b++) {
            __m512 v = _mm512_mul_ps(_mm512_loadu_ps(acc + 32 * b + n), _mm512_set1_ps(xs[b]));
            _mm512_mask_storeu_ps(y + b * O + n, m, _mm512_add_ps(v, bv));
        }
    }
}

/* y [B][O] = the W4A8 product (qd_int4_gemm's sums: per group the int32 dot times the group
 * scale, summed over groups in float, then times x_scale plus bias) with AMX: activations
 * quantized into A tiles as int8_amx_linear does, a pair of output tiles expanded by
 * int4_expand, then per batch block of up to 32 rows and per group (g / 64 steps: g a multiple
 * of 64, I of g) the tiles' int32 dots stored and added in float. Returns as int8_amx_linear. */
static int64_t int4_amx_linear(const uint8_t *w, const float *s, const uint8_t *zp,
                               const float *bias, int64_t O, int64_t I, int64_t g, float eps,
                               const float *x, float *y, int64_t B) {
    if (B <= 0 || O <= 0) return 0;
    int64_t KS = I / 64, G = I / g, kpg = g / 64, T = (O + 15) / 16;
    int64_t Bp = (B + 15) / 16 * 16, NP = (O + AMX_PAIR - 1) / AMX_PAIR;
    char *buf = (char *)malloc((size_t)B * 4 + (size_t)Bp * (size_t)KS * AMX_KSTEP);
    if (!buf) return -1;
    float *x_scale = (float *)buf;
    int8_t *xa = (int8_t *)(buf + 4 * B);
    int failed = 0;
    int64_t bad = 0;
#pragma omp parallel if (B * O * I >= PARALLEL_MIN_WORK) reduction(| : failed)
    {
#pragma omp for schedule(static) reduction(+ : bad)
        for (int64_t r = 0; r < Bp; r++) bad += amx_quantize_slot(x, xa, x_scale, r, B, I, KS, eps);
        if (!bad) {
            int32_t c[32 * 32];
            float acc[32 * 32];
            int8_t *panel = (int8_t *)malloc((size_t)KS * 2048);
            failed = !panel;
            if (!failed) amx_begin();
#pragma omp for schedule(static)
            for (int64_t p = 0; p < NP; p++) {
                if (failed) continue;
                int64_t o0 = p * AMX_PAIR;
                int cols = O - o0 < AMX_PAIR ? (int)(O - o0) : AMX_PAIR;
                int two = 2 * p + 1 < T; /* the pair's second tile exists */
                for (int t = 0; t < 2; t++) {
                    if (t == 0 || two)
                        int4_expand(w + (2 * p + t) * (I / 8) * 64, zp + (2 * p + t) * G * 16,
                                    g / 8, KS, panel + 1024 * t);
                    else
                        for (int64_t k = 0; k < KS; k++) memset(panel + 2048 * k + 1024, 0, 1024);
                }
                const float *s0 = s + 2 * p * G * 16, *s1 = two ? s0 + G * 16 : NULL;
                for (int64_t b0 = 0; b0 < B; b0 += 32) {
                    int rows = B - b0 < 32 ? (int)(B - b0) : 32;
                    memset(acc, 0, sizeof acc);
                    for (int64_t gi = 0; gi < G; gi++) {
                        amx_pair(panel + gi * kpg * 2048, xa + (b0 / 16 * KS + gi * kpg) * 1024,
                                 kpg, KS * 1024, rows > 16 ? 2 : 1, 0, c);
                        int4_amx_fma(c, rows, s0 + 16 * gi, s1 ? s1 + 16 * gi : NULL, acc);
                    }
                    int4_amx_store(acc, rows, cols, x_scale + b0, bias ? bias + o0 : NULL,
                                   y + b0 * O + o0, O);
                }
            }
            if (!failed) amx_end();
            free(panel);
        }
    }
    free(buf);
    if (bad) return bad;
    return failed ? -1 : 0;
}
#endif

int qd_has_amx(void) {
#ifdef QD_AMX
    return has_amx();
#else
    return 0;
#endif
}

/* ------------------------------------------------------------------------------------------
 * Weight-only: 2- or 4-bit codes (file layout "lsb") x float activations, by table lookup
 * ------------------------------------------------------------------------------------------ */

/* x rows [B][I] -> chunks of 128/bits weights (16 bytes of codes): within chunk c, part p (the
 * p-th code of each byte, bits p*bits..) lane l is x[c * 16 * per + per * l + p]. */
static void deinterleave(const float *x, float *xd, int64_t B, int64_t I, int per) {
    int64_t n_chunks = I / (16 * per);
    for (int64_t r = 0; r < B; r++)
        for (int64_t c = 0; c < n_chunks; c++)
            for (int p = 0; p < per; p++)
                for (int l = 0; l < 16; l++)
                    xd[r * I + (c * per + p) * 16 + l] = x[r * I + c * 16 * per + per * l + p];
}

#ifdef __x86_64__
/* The same table lookup with 8-lane AVX2: vpermps looks up 8 entries, so a 4-bit code takes
 * two lookups (codes 0-7 and 8-15) and a blend on the code's bit 3. */
__attribute__((always_inline, target("avx2,fma"))) static inline void lut_row_impl_avx2(
    const uint8_t *w, const float *s, const uint8_t *zp, int zp_const, const int bits,
    const float **xd, int64_t G, int64_t chunks_per_group, const int nb, float *out) {
    const int per = 8 / bits;
    const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
    const __m256i iota = _mm256_and_si256(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), mask);
    __m256 acc[NB][2];
    for (int b = 0; b < nb; b++) acc[b][0] = acc[b][1] = _mm256_setzero_ps();
    for (int64_t gi = 0; gi < G; gi++) {
        __m256i z = _mm256_set1_epi32(zp ? (int32_t)zp[gi] : zp_const);
        __m256 sv = _mm256_set1_ps(s[gi]);
        __m256 t_lo = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(iota, z)), sv);
        __m256 t_hi = _mm256_mul_ps(
            _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_add_epi32(iota, _mm256_set1_epi32(8)), z)), sv);
        int64_t c = gi * chunks_per_group, c_end = c + chunks_per_group;
        for (; c < c_end; c++) {
            for (int h = 0; h < 2; h++) {
                __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(w + 16 * c + 8 * h)));
                for (int p = 0; p < per; p++) {
                    __m256i idx = _mm256_and_si256(p ? _mm256_srli_epi32(v, bits * p) : v, mask);
                    __m256 wv = _mm256_permutevar8x32_ps(t_lo, idx);
                    if (bits == 4)
                        wv = _mm256_blendv_ps(wv, _mm256_permutevar8x32_ps(t_hi, idx),
                                              _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
                    for (int b = 0; b < nb; b++)
                        acc[b][h] = _mm256_fmadd_ps(
                            wv, _mm256_loadu_ps(xd[b] + (c * per + p) * 16 + 8 * h), acc[b][h]);
                }
            }
        }
    }
    for (int b = 0; b < nb; b++) out[b] = hsum_ps(_mm256_add_ps(acc[b][0], acc[b][1]));
}

__attribute__((target("avx2,fma"))) static void lut_row_avx2(const uint8_t *w, const float *s,
                                                              const uint8_t *zp, int zp_const,
                                                              int bits, const float **xd, int64_t G,
                                                              int64_t cpg, int nb, float *out) {
#define LUT4A(n) lut_row_impl_avx2(w, s, zp, zp_const, 4, xd, G, cpg, n, out)
#define LUT2A(n) lut_row_impl_avx2(w, s, zp, zp_const, 2, xd, G, cpg, n, out)
    if (bits == 4) { NB_SWITCH(nb, LUT4A) } else { NB_SWITCH(nb, LUT2A) }
#undef LUT4A
#undef LUT2A
}

#endif

static void lut_row_c(const uint8_t *w, const float *s, const uint8_t *zp, int zp_const, int bits,
                      const float **xd, int64_t G, int64_t chunks_per_group, int nb, float *out) {
    const int per = 8 / bits, mask = (1 << bits) - 1;
    for (int b = 0; b < nb; b++) {
        float acc = 0.0f;
        for (int64_t gi = 0; gi < G; gi++) {
            int32_t z = zp ? (int32_t)zp[gi] : zp_const;
            for (int64_t cc = 0; cc < chunks_per_group; cc++) {
                int64_t c = gi * chunks_per_group + cc;
                for (int p = 0; p < per; p++)
                    for (int l = 0; l < 16; l++) {
                        int code = (w[16 * c + l] >> (bits * p)) & mask;
                        acc += ((float)(code - z) * s[gi]) * xd[b][(c * per + p) * 16 + l];
                    }
            }
        }
        out[b] = acc;
    }
}

/* ---- Many rows: dequantize a panel once, then a register-blocked fp32 GEMM (#15 item 2) ----
 * From WO_PANEL_MIN_ROWS(_TILED) batch rows on (AVX2 / AVX-512 levels), the weight-only products
 * stop dequantizing every weight once per 4 batch rows: a thread takes WO_R output rows at a time,
 * dequantizes WO_KC inputs of each into a small float panel (vectorized, exactly the formats'
 * (c - zp) * s; L1-resident), and runs an outer-product micro-kernel over it (the BLIS /
 * oneDNN sgemm structure): each panel weight is broadcast and multiplied with 16 (8) batch rows
 * of a transposed activation block at once, WO_R x 2 vector accumulators in registers, so the
 * float multiply-adds run on full vectors with no horizontal sums. The activations are
 * transposed once per call into xt ([k][8, 16 or 32 rows] per group of batch rows, zero padded; in
 * the kernel's input order: the "lsb" 2/4-bit layout dequantizes a chunk in deinterleaved
 * order, see deinterleave). Partial sums of a panel live in cp between K blocks. Only the order
 * of the fp32 sums differs from F.linear on the dequantized weight. */
#define WO_KC 128           /* inputs per K block (a multiple of every lut chunk: 32, 64) */
#define WO_MB 128           /* batch rows per pass (bounds xt and cp) */
#define WO_R512 12          /* output rows per micro-kernel, AVX-512: 24 accumulators of 32 */
#define WO_R256 6           /* AVX2: 12 accumulators of 16 registers */
/* From this many batch rows on: 8 where only the one-row-at-a-time kernels exist (2/4-bit
 * codes with AVX2: the panel tied them at 8 rows and won 1.6-1.7x at 16); 16 where tiles of 4
 * output rows exist (int8, and 2/4-bit with AVX-512): two tile passes beat the panel at 8 rows
 * by 1.1-1.9x in an interleaved A/B (benchmarks/wo_ab.py, 1 thread, MiniLM and 4096 x 4096). */
#define WO_PANEL_MIN_ROWS 8
#define WO_PANEL_MIN_ROWS_TILED 16

/* The weight of a weight-only layer: int8 codes (kind 0) or "lsb" 2/4-bit codes (kind 1). */
typedef struct {
    int kind;
    const void *w;
    const float *s;
    const uint8_t *zp;
    int zp_const, bits;
    int64_t I, G, cpg, row_bytes;
} wo_weight;

/* Batch rows in the group of activations that starts rem rows before the end of a pass: 2L
 * lanes while more than L rows are left, then L, or L / 2 where that suffices (AVX-512: 8 rows
 * in one ymm instead of half an empty zmm). */
static inline int wo_width(int64_t rem, int L) {
    return rem > L ? 2 * L : (L == 16 && rem <= 8) ? 8 : L;
}

/* x rows b_start .. b_start + nbr - 1 -> xt: groups of wo_width rows, each [I][width] at
 * xt + b0 * I, zero padded, inputs in the kernel's order (lut: chunk c of 16 * per inputs holds
 * at (p * 16 + l) the input per * l + p, see deinterleave). */
static void wo_transpose(const wo_weight *W, const float *x, int64_t b_start, int64_t nbr,
                         int L, float *xt) {
    const int64_t I = W->I;
    const int per = W->kind == 0 ? 1 : 8 / W->bits;
    int64_t n_pad = 0; /* every group but the last is 2L rows wide */
    while (n_pad < nbr) n_pad += wo_width(nbr - n_pad, L);
#pragma omp parallel for schedule(static) if (n_pad * I >= PARALLEL_MIN_WORK / 8)
    for (int64_t jj = 0; jj < n_pad; jj++) {
        const int64_t b0 = jj / (2 * L) * (2 * L);
        const int width = wo_width(nbr - b0, L), j = (int)(jj - b0);
        float *dst = xt + b0 * I;
        if (jj >= nbr) {
            for (int64_t k = 0; k < I; k++) dst[k * width + j] = 0.0f;
            continue;
        }
        const float *xr = x + (b_start + jj) * I;
        if (per == 1) {
            for (int64_t k = 0; k < I; k++) dst[k * width + j] = xr[k];
            continue;
        }
        for (int64_t c = 0; c < I; c += 16 * per)
            for (int p = 0; p < per; p++)
                for (int l = 0; l < 16; l++) dst[(c + 16 * p + l) * width + j] = xr[c + per * l + p];
    }
}

#ifdef __x86_64__
/* The AVX-512 panel path (masked byte loads and 32 ymm registers need AVX-512 VL too). */
static int wo_wide(int level) {
    return level == 0 && has_avx512() && __builtin_cpu_supports("avx512vl");
}

#define WO512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,fma")))

/* Row o, kernel inputs k0 .. k0 + n - 1, dequantized into dst (AVX-512). */
WO512_TARGET static void wo_dequant_avx512(const wo_weight *W, int64_t o, int64_t k0, int64_t n,
                                           float *dst) {
    if (W->kind == 0) {
        const int8_t *w = (const int8_t *)W->w + o * W->I + k0;
        const __m512 sv = _mm512_set1_ps(W->s[o]);
        for (int64_t i = 0; i < n; i += 16) {
            __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
            __m512i c = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, w + i));
            _mm512_mask_storeu_ps(dst + i, m, _mm512_mul_ps(_mm512_cvtepi32_ps(c), sv));
        }
        return;
    }
    const int bits = W->bits, per = 8 / bits;
    const uint8_t *w = (const uint8_t *)W->w + o * W->row_bytes;
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i codes_of_lane = _mm512_and_si512(iota, _mm512_set1_epi32((1 << bits) - 1));
    const int64_t c0 = k0 / (16 * per), c1 = (k0 + n) / (16 * per);
    int64_t gi = c0 / W->cpg, left = 0;
    __m512 table = _mm512_setzero_ps();
    for (int64_t c = c0; c < c1; c++) {
        if (left == 0) { /* a new group (or the first chunk): its table */
            left = c == c0 ? W->cpg - c0 % W->cpg : W->cpg;
            gi += c != c0;
            int32_t z = W->zp ? (int32_t)W->zp[o * W->G + gi] : W->zp_const;
            table = _mm512_mul_ps(
                _mm512_cvtepi32_ps(_mm512_sub_epi32(codes_of_lane, _mm512_set1_epi32(z))),
                _mm512_set1_ps(W->s[o * W->G + gi]));
        }
        left--;
        __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w + 16 * c)));
        float *d = dst + (c - c0) * 16 * per;
        for (int p = 0; p < per; p++)
            _mm512_storeu_ps(d + 16 * p,
                             _mm512_permutexvar_ps(p ? _mm512_srli_epi32(v, bits * p) : v, table));
    }
}

/* cp[R][16 V] (+)= wd[R][WO_KC] x xt[n][16 V]: the outer-product micro-kernel. */
__attribute__((always_inline, target("avx512f,avx512bw,avx512vl,fma"))) static inline void
wo_micro_impl512(const float *wd, const float *xt, int64_t n, const int V, float *cp, int first) {
    __m512 acc[WO_R512][2];
    for (int r = 0; r < WO_R512; r++)
        for (int v = 0; v < V; v++)
            acc[r][v] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(cp + (r * V + v) * 16);
    for (int64_t k = 0; k < n; k++) {
        __m512 xv[2];
        for (int v = 0; v < V; v++) xv[v] = _mm512_loadu_ps(xt + (k * V + v) * 16);
        for (int r = 0; r < WO_R512; r++) {
            __m512 wb = _mm512_set1_ps(wd[r * WO_KC + k]);
            for (int v = 0; v < V; v++) acc[r][v] = _mm512_fmadd_ps(wb, xv[v], acc[r][v]);
        }
    }
    for (int r = 0; r < WO_R512; r++)
        for (int v = 0; v < V; v++) _mm512_storeu_ps(cp + (r * V + v) * 16, acc[r][v]);
}

/* 8 batch rows: one ymm per output row (AVX-512 VL: 32 registers, so WO_R512 rows). */
WO512_TARGET static void wo_micro8_avx512(const float *wd, const float *xt, int64_t n, float *cp,
                                          int first) {
    __m256 acc[WO_R512];
    for (int r = 0; r < WO_R512; r++)
        acc[r] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(cp + r * 8);
    for (int64_t k = 0; k < n; k++) {
        __m256 xv = _mm256_loadu_ps(xt + k * 8);
        for (int r = 0; r < WO_R512; r++)
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(wd[r * WO_KC + k]), xv, acc[r]);
    }
    for (int r = 0; r < WO_R512; r++) _mm256_storeu_ps(cp + r * 8, acc[r]);
}

WO512_TARGET static void wo_micro_avx512(const float *wd, const float *xt, int64_t n, int width,
                                         float *cp, int first) {
    if (width == 32) wo_micro_impl512(wd, xt, n, 2, cp, first);
    else if (width == 16) wo_micro_impl512(wd, xt, n, 1, cp, first);
    else wo_micro8_avx512(wd, xt, n, cp, first);
}

/* The same with 8-lane AVX2. */
__attribute__((target("avx2,fma"))) static void wo_dequant_avx2(const wo_weight *W, int64_t o,
                                                                 int64_t k0, int64_t n, float *dst) {
    if (W->kind == 0) {
        const int8_t *w = (const int8_t *)W->w + o * W->I + k0;
        const float s = W->s[o];
        const __m256 sv = _mm256_set1_ps(s);
        int64_t i = 0;
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                                        _mm_loadl_epi64((const __m128i *)(w + i)))),
                                                    sv));
        for (; i < n; i++) dst[i] = (float)w[i] * s;
        return;
    }
    const int bits = W->bits, per = 8 / bits;
    const uint8_t *w = (const uint8_t *)W->w + o * W->row_bytes;
    const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
    const __m256i iota = _mm256_and_si256(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), mask);
    const int64_t c0 = k0 / (16 * per), c1 = (k0 + n) / (16 * per);
    int64_t gi = c0 / W->cpg, left = 0;
    __m256 t_lo = _mm256_setzero_ps(), t_hi = t_lo;
    for (int64_t c = c0; c < c1; c++) {
        if (left == 0) {
            left = c == c0 ? W->cpg - c0 % W->cpg : W->cpg;
            gi += c != c0;
            __m256i z = _mm256_set1_epi32(W->zp ? (int32_t)W->zp[o * W->G + gi] : W->zp_const);
            __m256 sv = _mm256_set1_ps(W->s[o * W->G + gi]);
            t_lo = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(iota, z)), sv);
            t_hi = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(
                                     _mm256_add_epi32(iota, _mm256_set1_epi32(8)), z)),
                                 sv);
        }
        left--;
        float *d = dst + (c - c0) * 16 * per;
        for (int h = 0; h < 2; h++) {
            __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(w + 16 * c + 8 * h)));
            for (int p = 0; p < per; p++) {
                __m256i idx = _mm256_and_si256(p ? _mm256_srli_epi32(v, bits * p) : v, mask);
                __m256 wv = _mm256_permutevar8x32_ps(t_lo, idx);
                if (bits == 4)
                    wv = _mm256_blendv_ps(wv, _mm256_permutevar8x32_ps(t_hi, idx),
                                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
                _mm256_storeu_ps(d + 16 * p + 8 * h, wv);
            }
        }
    }
}

/* V = 1 and 2 apart, with flat accumulator arrays: GCC kept a shared [R][2] array in memory
 * (a store after every FMA) for the 16-register AVX2 target. */
__attribute__((always_inline, target("avx2,fma"))) static inline void
wo_micro1_avx2(const float *wd, const float *xt, int64_t n, float *cp, int first) {
    __m256 acc[WO_R256];
    for (int r = 0; r < WO_R256; r++) acc[r] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(cp + r * 8);
    for (int64_t k = 0; k < n; k++) {
        const __m256 xv = _mm256_loadu_ps(xt + k * 8);
        for (int r = 0; r < WO_R256; r++)
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(wd[r * WO_KC + k]), xv, acc[r]);
    }
    for (int r = 0; r < WO_R256; r++) _mm256_storeu_ps(cp + r * 8, acc[r]);
}

__attribute__((always_inline, target("avx2,fma"))) static inline void
wo_micro2_avx2(const float *wd, const float *xt, int64_t n, float *cp, int first) {
    __m256 a0[WO_R256], a1[WO_R256];
    for (int r = 0; r < WO_R256; r++) {
        a0[r] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(cp + r * 16);
        a1[r] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(cp + r * 16 + 8);
    }
    for (int64_t k = 0; k < n; k++) {
        const __m256 x0 = _mm256_loadu_ps(xt + k * 16), x1 = _mm256_loadu_ps(xt + k * 16 + 8);
        for (int r = 0; r < WO_R256; r++) {
            const __m256 wb = _mm256_set1_ps(wd[r * WO_KC + k]);
            a0[r] = _mm256_fmadd_ps(wb, x0, a0[r]);
            a1[r] = _mm256_fmadd_ps(wb, x1, a1[r]);
        }
    }
    for (int r = 0; r < WO_R256; r++) {
        _mm256_storeu_ps(cp + r * 16, a0[r]);
        _mm256_storeu_ps(cp + r * 16 + 8, a1[r]);
    }
}

__attribute__((target("avx2,fma"))) static void wo_micro_avx2(const float *wd, const float *xt,
                                                               int64_t n, int width, float *cp,
                                                               int first) {
    if (width == 16) wo_micro2_avx2(wd, xt, n, cp, first);
    else wo_micro1_avx2(wd, xt, n, cp, first);
}

/* y [B][O] = x [B][I] W^T + bias through panels (wide: 1 = AVX-512, 0 = AVX2). Returns -1
 * (y untouched) when the activation block cannot be allocated: the caller then takes the
 * row-at-a-time path, which needs no more memory. */
static int wo_panel_gemm(const wo_weight *W, const float *x, const float *bias, float *y,
                         int64_t B, int64_t O, int wide) {
    const int L = wide ? 16 : 8, R = wide ? WO_R512 : WO_R256;
    const int64_t I = W->I, mb = B < WO_MB ? B : WO_MB;
    float *xt = (float *)malloc((size_t)(((mb + 2 * L - 1) / (2 * L)) * 2 * L * I) * sizeof(float));
    if (!xt) return -1;
    for (int64_t b_start = 0; b_start < B; b_start += WO_MB) {
        const int64_t nbr = B - b_start < WO_MB ? B - b_start : WO_MB;
        wo_transpose(W, x, b_start, nbr, L, xt);
#pragma omp parallel for schedule(static) if (nbr * O * I >= PARALLEL_MIN_WORK)
        for (int64_t o0 = 0; o0 < O; o0 += R) {
            float wd[WO_R512 * WO_KC] __attribute__((aligned(64)));
            float cp[(WO_MB + 32) * WO_R512] __attribute__((aligned(64)));
            const int rows = O - o0 < R ? (int)(O - o0) : R;
            for (int64_t k0 = 0; k0 < I; k0 += WO_KC) {
                const int64_t n = I - k0 < WO_KC ? I - k0 : WO_KC;
                for (int r = 0; r < R; r++) {
                    if (r >= rows) memset(wd + r * WO_KC, 0, (size_t)n * sizeof(float));
                    else if (wide) wo_dequant_avx512(W, o0 + r, k0, n, wd + r * WO_KC);
                    else wo_dequant_avx2(W, o0 + r, k0, n, wd + r * WO_KC);
                }
                for (int64_t b0 = 0; b0 < nbr; b0 += wo_width(nbr - b0, L)) {
                    const int width = wo_width(nbr - b0, L);
                    const float *xb = xt + b0 * I + k0 * width;
                    if (wide) wo_micro_avx512(wd, xb, n, width, cp + b0 * R, k0 == 0);
                    else wo_micro_avx2(wd, xb, n, width, cp + b0 * R, k0 == 0);
                }
            }
            for (int64_t b0 = 0; b0 < nbr; b0 += wo_width(nbr - b0, L)) {
                const int width = wo_width(nbr - b0, L);
                const float *c = cp + b0 * R;
                for (int r = 0; r < rows; r++) {
                    const float bo = bias ? bias[o0 + r] : 0.0f;
                    for (int j = 0; j < width && b0 + j < nbr; j++)
                        y[(b_start + b0 + j) * O + o0 + r] = c[r * width + j] + bo;
                }
            }
        }
    }
    free(xt);
    return 0;
}
#endif

/* ---- Few rows: several output rows per pass (#15 item 1) ----
 * A tile of WO_TR output rows and nb (<= NB) batch rows: the WO_TR x nb accumulators stay in
 * registers for the whole row (R and nb are compile-time constants of every instantiation),
 * each activation load feeds WO_TR rows, and the weight rows stream with a software prefetch
 * of the next tile's rows at the same offset (one tile ahead: rows are contiguous, so a fixed
 * 1 KB ahead of each row landed in the next row of the same tile, already being read, and the
 * next tile's rows started cold; one tile ahead ran the int8 VNNI row 1.2x and the 4-bit one
 * 1.3x faster on 4096 x 4096, benchmarks/wo_ab.py). int8: the code is converted (vpmovsxbd +
 * vcvtdq2ps) and the row's scale applied once to the finished sum; lut: as lut_row_impl_avx2,
 * with one table per row and group. */
#define WO_TR 4

#ifdef __x86_64__
__attribute__((always_inline, target("avx512f,avx512bw,avx512vl,fma"))) static inline void
i8w_tile_impl512(const int8_t *w, int64_t I, const int R, const float *s, const float **x,
                 const int nb, float *out) {
    __m512 acc[WO_TR][NB];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < nb; b++) acc[r][b] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= I; i += 64) {
        for (int r = 0; r < R; r++) _mm_prefetch((const char *)(w + (r + R) * I + i), _MM_HINT_T0);
        for (int u = 0; u < 4; u++) {
            __m512 xv[NB];
            for (int b = 0; b < nb; b++) xv[b] = _mm512_loadu_ps(x[b] + i + 16 * u);
            for (int r = 0; r < R; r++) {
                __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                    _mm_loadu_si128((const __m128i *)(w + r * I + i + 16 * u))));
                for (int b = 0; b < nb; b++) acc[r][b] = _mm512_fmadd_ps(wv, xv[b], acc[r][b]);
            }
        }
    }
    for (; i < I; i += 16) {
        __mmask16 m = I - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (I - i)) - 1);
        __m512 xv[NB];
        for (int b = 0; b < nb; b++) xv[b] = _mm512_maskz_loadu_ps(m, x[b] + i);
        for (int r = 0; r < R; r++) {
            __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, w + r * I + i)));
            for (int b = 0; b < nb; b++) acc[r][b] = _mm512_fmadd_ps(wv, xv[b], acc[r][b]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int b = 0; b < nb; b++) out[r * NB + b] = _mm512_reduce_add_ps(acc[r][b]) * s[r];
}

WO512_TARGET static void i8w_tile_avx512(const int8_t *w, int64_t I, int R, const float *s,
                                         const float **x, int nb, float *out) {
#define I8T4(n) i8w_tile_impl512(w, I, WO_TR, s, x, n, out)
#define I8T1(n) i8w_tile_impl512(w, I, 1, s, x, n, out)
    if (R == WO_TR) { NB_SWITCH(nb, I8T4) } else { NB_SWITCH(nb, I8T1) }
#undef I8T4
#undef I8T1
}

/* The int8 tile with 8-lane AVX2 (16 registers: 4 output rows for 1-2 batch rows, 2 for 3-4). */
__attribute__((always_inline, target("avx2,fma"))) static inline void
i8w_tile_impl256(const int8_t *w, int64_t I, const int R, const float *s, const float **x,
                 const int nb, float *out) {
    __m256 acc[WO_TR][NB];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < nb; b++) acc[r][b] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= I; i += 32) {
        for (int r = 0; r < R; r++) _mm_prefetch((const char *)(w + (r + R) * I + i), _MM_HINT_T0);
        for (int u = 0; u < 4; u++) {
            __m256 xv[NB];
            for (int b = 0; b < nb; b++) xv[b] = _mm256_loadu_ps(x[b] + i + 8 * u);
            for (int r = 0; r < R; r++) {
                __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                    _mm_loadl_epi64((const __m128i *)(w + r * I + i + 8 * u))));
                for (int b = 0; b < nb; b++) acc[r][b] = _mm256_fmadd_ps(wv, xv[b], acc[r][b]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int b = 0; b < nb; b++) {
            float total = hsum_ps(acc[r][b]);
            for (int64_t j = i; j < I; j++) total += (float)w[r * I + j] * x[b][j];
            out[r * NB + b] = total * s[r];
        }
}

__attribute__((target("avx2,fma"))) static void i8w_tile_avx2(const int8_t *w, int64_t I, int R,
                                                               const float *s, const float **x,
                                                               int nb, float *out) {
    if (R == 1) {
        switch (nb) {
        case 1: i8w_tile_impl256(w, I, 1, s, x, 1, out); break;
        case 2: i8w_tile_impl256(w, I, 1, s, x, 2, out); break;
        case 3: i8w_tile_impl256(w, I, 1, s, x, 3, out); break;
        default: i8w_tile_impl256(w, I, 1, s, x, 4, out);
        }
    } else if (R == 2) {
        switch (nb) {
        case 1: i8w_tile_impl256(w, I, 2, s, x, 1, out); break;
        case 2: i8w_tile_impl256(w, I, 2, s, x, 2, out); break;
        case 3: i8w_tile_impl256(w, I, 2, s, x, 3, out); break;
        default: i8w_tile_impl256(w, I, 2, s, x, 4, out);
        }
    } else { /* WO_TR rows: chosen for at most 2 batch rows */
        if (nb == 1) i8w_tile_impl256(w, I, WO_TR, s, x, 1, out);
        else i8w_tile_impl256(w, I, WO_TR, s, x, 2, out);
    }
}

/* lut: rows w + r * row_bytes, scales / zero points s + r * G, zp + r * G (or zp_const). */
__attribute__((always_inline, target("avx512f,avx512bw,avx512vl,fma"))) static inline void
lut_tile_impl512(const uint8_t *w, int64_t row_bytes, const float *s, const uint8_t *zp,
                 int zp_const, const int bits, const float **xd, int64_t G, int64_t cpg,
                 const int R, const int nb, float *out) {
    const int per = 8 / bits;
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i codes_of_lane = _mm512_and_si512(iota, _mm512_set1_epi32((1 << bits) - 1));
    const __m512 base = _mm512_cvtepi32_ps(_mm512_sub_epi32(codes_of_lane, _mm512_set1_epi32(zp_const)));
    const __m512 lanes = _mm512_cvtepi32_ps(codes_of_lane);
    __m512 acc[WO_TR][NB];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < nb; b++) acc[r][b] = _mm512_setzero_ps();
    for (int64_t gi = 0; gi < G; gi++) {
        __m512 table[WO_TR];
        for (int r = 0; r < R; r++) {
            /* ((i & mask) - zp) * s, exactly IntFormat's dequantized value (the difference of
               two small integers is exact in fp32) */
            __m512 d = zp ? _mm512_sub_ps(lanes, _mm512_set1_ps((float)zp[r * G + gi])) : base;
            table[r] = _mm512_mul_ps(d, _mm512_set1_ps(s[r * G + gi]));
        }
        for (int64_t c = gi * cpg, c_end = c + cpg; c < c_end; c++) {
            for (int r = 0; r < R; r++)
                _mm_prefetch((const char *)(w + (r + R) * row_bytes + 16 * c), _MM_HINT_T0);
            for (int r = 0; r < R; r++) {
                __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w + r * row_bytes + 16 * c)));
                for (int p = 0; p < per; p++) {
                    /* vpermps reads the low 4 bits of each index; the table repeats with period
                       2**bits, so the codes above them are harmless */
                    __m512 wv = _mm512_permutexvar_ps(p ? _mm512_srli_epi32(v, bits * p) : v, table[r]);
                    for (int b = 0; b < nb; b++)
                        acc[r][b] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xd[b] + (c * per + p) * 16), acc[r][b]);
                }
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int b = 0; b < nb; b++) out[r * NB + b] = _mm512_reduce_add_ps(acc[r][b]);
}

WO512_TARGET static void lut_tile_avx512(const uint8_t *w, int64_t row_bytes, const float *s,
                                         const uint8_t *zp, int zp_const, int bits,
                                         const float **xd, int64_t G, int64_t cpg, int R, int nb,
                                         float *out) {
#define LT(b_, r_, n) lut_tile_impl512(w, row_bytes, s, zp, zp_const, b_, xd, G, cpg, r_, n, out)
#define LT44(n) LT(4, WO_TR, n)
#define LT41(n) LT(4, 1, n)
#define LT24(n) LT(2, WO_TR, n)
#define LT21(n) LT(2, 1, n)
    if (bits == 4) {
        if (R == WO_TR) { NB_SWITCH(nb, LT44) } else { NB_SWITCH(nb, LT41) }
    } else {
        if (R == WO_TR) { NB_SWITCH(nb, LT24) } else { NB_SWITCH(nb, LT21) }
    }
#undef LT
#undef LT44
#undef LT41
#undef LT24
#undef LT21
}
#endif

/* ---- int8 weights x fp32 activations with VNNI, one row ----
 * The float path spends 3 vector instructions per 16 weights (widen, convert, FMA): with
 * AVX-512 VNNI the product becomes integer arithmetic that is exact. Each activation row is
 * written x_i = sx * q_i + e_i with q_i = nearbyint(x_i / sx) an integer of 23 bits (sx =
 * max|x| / WO_QMAX, so |e_i| <= max|x| * 2^-23.98: the precision of an fp32 sum of the row), and
 * q_i split into three signed bytes (balanced base 256: q = d0 + 256 d1 + 65536 d2). Then
 * sum_i w_i x_i = sx * sum_p 256^p sum_i w_i d_p,i up to the e_i: three exact integer dot
 * products, 64 weights per vpdpbusd (u8 x s8: the unsigned operand is the stored code c = w + 128,
 * and sum_i w d = sum_i c d - 128 sum_i d). 4 instructions per 64 weights instead of 12, so the
 * batch-1 product is bound by the memory stream, not the vector ports. A row holding NaN or Inf
 * takes the float path (its products must be NaN / Inf as in F.linear). */
#define WO_QMAX 8257536       /* 2^23 - 2^17: every balanced digit stays in [-128, 127] */
#define WO_VNNI_MAX_I 65536   /* |sum_i c d| <= 255 * 128 * I < 2^31 */
/* One row: three vpdpbusd per 64 weights and row; from 2 rows on the float tiles (one widening
 * per weight, shared by the rows) were faster in an A/B (benchmarks/wo_ab.py). */
#define WO_VNNI_MAX_ROWS 1

#ifdef __x86_64__
/* The split of a row into digit planes, vectorized (it ran ~5 ns an input in scalar C: 20 us of a
 * 4096-wide row, a tenth of a 4096 x 4096 product on one thread). Every step is the scalar
 * definition lane by lane: q = llrint((double)x * inv) (vcvtpd2dq rounds to nearest even, as
 * llrint in the default mode), digits by masks and exact arithmetic shifts. */
#define WO_SPLIT_TARGET __attribute__((target("avx512f,avx512bw")))

/* max |x_i|, or -1 if some x_i is NaN or infinite. */
WO_SPLIT_TARGET static float wo_row_amax(const float *x, int64_t I) {
    const __m512 big = _mm512_set1_ps(FLT_MAX);
    __m512 m = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (int64_t i = 0; i < I; i += 16) {
        const __mmask16 k = I - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (I - i)) - 1);
        const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(k, x + i));
        bad |= _mm512_cmp_ps_mask(a, big, _CMP_NLE_UQ); /* NaN or above FLT_MAX */
        m = _mm512_max_ps(m, a);
    }
    return bad ? -1.0f : _mm512_reduce_max_ps(m);
}

/* 16 inputs (lanes outside k read as 0) -> q = nearbyint(x * inv) as int32 lanes. */
WO_SPLIT_TARGET static inline __m512i wo_q16(const float *x, __mmask16 k, __m512d inv) {
    const __m512 xv = _mm512_maskz_loadu_ps(k, x);
    const __m256 xh = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(xv), 1));
    const __m256i lo = _mm512_cvtpd_epi32(_mm512_mul_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(xv)), inv));
    const __m256i hi = _mm512_cvtpd_epi32(_mm512_mul_pd(_mm512_cvtps_pd(xh), inv));
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

/* q (|q| <= WO_QMAX) -> balanced digits: q = d0 + 256 d1 + 65536 d2, d0, d1 in [-128, 127],
 * |d2| <= 126 (q - d0 is a multiple of 256: the arithmetic shift divides exactly). */
WO_SPLIT_TARGET static inline void wo_digits(__m512i v, __m512i *d) {
    const __m512i c128 = _mm512_set1_epi32(128), c255 = _mm512_set1_epi32(255);
    d[0] = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(v, c128), c255), c128);
    v = _mm512_srai_epi32(_mm512_sub_epi32(v, d[0]), 8);
    d[1] = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(v, c128), c255), c128);
    d[2] = _mm512_srai_epi32(_mm512_sub_epi32(v, d[1]), 8);
}

/* x [I] -> digit planes q [3][I_pad] (zero padded), their sums, sx. 1 if x is not finite. */
WO_SPLIT_TARGET static int wo_split_row(const float *x, int64_t I, int64_t I_pad, int8_t *q,
                                        int32_t *qsum, double *sx) {
    const float amax = wo_row_amax(x, I);
    if (amax < 0.0f) return 1;
    const __m512d inv = _mm512_set1_pd(amax > 0.0f ? WO_QMAX / (double)amax : 0.0);
    *sx = (double)amax / WO_QMAX;
    __m512i sum[3] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    int64_t i = 0;
    for (; i < I; i += 16) { /* i + 16 <= I_pad (a multiple of 64): whole 16-byte stores */
        const __mmask16 k = I - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (I - i)) - 1);
        __m512i d[3];
        wo_digits(wo_q16(x + i, k, inv), d);
        for (int p = 0; p < 3; p++) {
            _mm_storeu_si128((__m128i *)(q + p * I_pad + i), _mm512_cvtepi32_epi8(d[p]));
            sum[p] = _mm512_add_epi32(sum[p], d[p]);
        }
    }
    for (int p = 0; p < 3; p++) {
        memset(q + p * I_pad + i, 0, (size_t)(I_pad - i));
        qsum[p] = _mm512_reduce_add_epi32(sum[p]);
    }
    return 0;
}
#endif

#ifdef __x86_64__
/* R output rows (w + r * I) x one split activation row: dots[r][p] = sum_i c_r,i d_p,i. */
__attribute__((always_inline, target("avx512f,avx512bw,avx512vnni"))) static inline void
i8w_vnni_impl(const int8_t *w, int64_t I, int64_t I_pad, const int R, const int8_t *q,
              int32_t *dots) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512i acc[WO_TR][3];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = acc[r][2] = _mm512_setzero_si512();
    int64_t i = 0;
    for (; i < I; i += 64) {
        const __mmask64 m = I - i >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (I - i)) - 1);
        const __m512i d0 = _mm512_loadu_si512((const void *)(q + i));
        const __m512i d1 = _mm512_loadu_si512((const void *)(q + I_pad + i));
        const __m512i d2 = _mm512_loadu_si512((const void *)(q + 2 * I_pad + i));
        for (int r = 0; r < R; r++) {
            _mm_prefetch((const char *)(w + (r + R) * I + i), _MM_HINT_T0); /* a tile ahead */
            /* past the row's end the code reads as 0x80 (128), times a zero digit */
            __m512i c = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, w + r * I + i), flip);
            acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], c, d0);
            acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], c, d1);
            acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], c, d2);
        }
    }
    for (int r = 0; r < R; r++)
        for (int p = 0; p < 3; p++) dots[3 * r + p] = _mm512_reduce_add_epi32(acc[r][p]);
}

VNNI_TARGET static void i8w_vnni_tile(const int8_t *w, int64_t I, int64_t I_pad, int R,
                                      const int8_t *q, int32_t *dots) {
    if (R == WO_TR) i8w_vnni_impl(w, I, I_pad, WO_TR, q, dots);
    else i8w_vnni_impl(w, I, I_pad, 1, q, dots);
}

/* y = x W^T * s + bias for B (<= WO_VNNI_MAX_ROWS) rows. Returns 0, or 1 (y untouched: the
 * caller takes the float path) if x holds NaN / Inf or the digit planes cannot be allocated. */
static int i8w_vnni_gemm(const int8_t *w, const float *w_scale, const float *x,
                         const float *bias, float *y, int64_t B, int64_t O, int64_t I) {
    const int64_t I_pad = (I + 63) / 64 * 64;
    int8_t *q = (int8_t *)malloc((size_t)(3 * B * I_pad));
    int32_t qsum[3 * WO_VNNI_MAX_ROWS];
    double sx[WO_VNNI_MAX_ROWS];
    if (!q) return 1;
    for (int64_t b = 0; b < B; b++)
        if (wo_split_row(x + b * I, I, I_pad, q + 3 * b * I_pad, qsum + 3 * b, sx + b)) {
            free(q);
            return 1;
        }
#pragma omp parallel for schedule(static) if (B * O * I >= PARALLEL_MIN_WORK)
    for (int64_t t = 0; t < (O + WO_TR - 1) / WO_TR; t++) {
        const int64_t o_end = (t + 1) * WO_TR < O ? (t + 1) * WO_TR : O;
        for (int64_t o = t * WO_TR; o < o_end;) {
            const int R = o_end - o >= WO_TR ? WO_TR : 1;
            for (int64_t b = 0; b < B; b++) {
                int32_t dots[3 * WO_TR];
                const int32_t *qs = qsum + 3 * b;
                i8w_vnni_tile(w + o * I, I, I_pad, R, q + 3 * b * I_pad, dots);
                for (int r = 0; r < R; r++) {
                    int64_t d = 0;
                    for (int p = 2; p >= 0; p--)
                        d = d * 256 + ((int64_t)dots[3 * r + p] - 128 * (int64_t)qs[p]);
                    y[b * O + o + r] = (float)((double)d * sx[b] * (double)w_scale[o + r]) +
                                       (bias ? bias[o + r] : 0.0f);
                }
            }
            o += R;
        }
    }
    free(q);
    return 0;
}
#endif

/* ---- 4-bit codes x fp32 activations with VNNI, few rows ----
 * The float lookup (lut_tile_impl512) spends ~24 vector instructions per 128 codes and row (widen,
 * shift, vpermps and FMA per 16), 12 of them on port 5. As for int8 (i8w_vnni_gemm), each
 * activation row is written x_i = sx * q_i + e_i with q_i = nearbyint(x_i / sx) a 23-bit integer
 * (sx = max|x| / WO_QMAX, |e_i| <= max|x| * 2^-23.98) in three balanced byte digits, stored per 128
 * inputs (64 bytes of "lsb" codes: byte j holds input 2j in its low nibble and 2j + 1 in its high
 * one) as six 64-byte planes, even and odd inputs of digit 2, 1, 0. A 64-byte line of codes is
 * unpacked into its low and high nibbles as in W4A8 (int4_gemv_impl: and, shift + and) and each
 * 32-bit lane, 8 codes of one group (every group holds whole lanes: g % 8 == 0), takes the exact
 * sum T = sum c_i q_i by Horner's rule over the digits: two vpdpbusd a digit (u8 nibble x s8
 * digit), a shift by 8 between digits (a byte shuffle, port 5), no overflow (|T| <= 8 * 15 *
 * WO_QMAX < 2^31). The zero point leaves the lane exactly too: T - zp * Q with Q = sum q_i over the
 * lane's 8 inputs (computed with the planes; |c - zp| <= 15 keeps it in int32, and a tile whose
 * zero points exceed 15 takes the float path), then one convert and one FMA with the lane's group
 * scale. So the only roundings are those of fp32 sums (of 16-lane partial sums of s * (c - zp) * q)
 * and the split of x: the error against F.linear on the dequantized weight is of the order of
 * fp32's own (bound: sum_i |w_i| max|x| 2^-23.98 from the split, plus the fp32 accumulation; at
 * most 2.0x fp32 F.linear's distance to float64 over 48 rows of 16 layouts; ~6x for a row spanning
 * 8 decades, where the split's absolute error dominates). Per 128 codes and row
 * 6 vpdpbusd + 1 shift + 1 convert on port 0 against 8 vpermps + 4 widenings on port 5: 1.65x the
 * float tiles on a 4096 x 4096 row, 1.8x on runtime.py's 151 MB model (one thread, warm or cold;
 * benchmarks/results/wo-kernels.md), the row at its port-0 bound warm. Rows holding NaN / Inf take
 * the float path, as do 2-bit codes, 2+ batch rows (the float tiles share each lookup between batch
 * rows, the digits cannot be shared: 0.7-1.0x at 2-4 rows) and groups that are neither 32, 64 nor a
 * multiple of 128 (one row-wide group always qualifies). */
#define WO4_VNNI_MAX_ROWS 1 /* batch rows (see the A/B in benchmarks/results/wo-kernels.md) */
#define WO4_CHUNK 128       /* inputs per 64-byte line of 4-bit codes */
#define WO4_PLANE_BYTES (6 * 64)

#ifdef __x86_64__
/* x [I] (I % 16 == 0) -> planes [n_chunks][6][64] (digit 2 even / odd, 1, 0), Q [n_chunks][16]
 * (sum of q over each lane's 8 inputs), sx; zero padded to whole chunks. 1 if x is not
 * finite. */
WO_SPLIT_TARGET static int wo4_split_row(const float *x, int64_t I, int64_t n_chunks,
                                         int8_t *planes, int32_t *Q, double *sx) {
    const float amax = wo_row_amax(x, I);
    if (amax < 0.0f) return 1;
    const __m512d inv = _mm512_set1_pd(amax > 0.0f ? WO_QMAX / (double)amax : 0.0);
    *sx = (double)amax / WO_QMAX;
    /* lanes: even inputs, then odd ones */
    const __m512i eo = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    memset(planes + (n_chunks - 1) * WO4_PLANE_BYTES, 0, WO4_PLANE_BYTES);
    memset(Q + (n_chunks - 1) * 16, 0, 16 * sizeof(int32_t));
    for (int64_t i = 0; i < I; i += 16) {
        __m512i d[3];
        const __m512i v = wo_q16(x + i, (__mmask16)0xFFFF, inv);
        wo_digits(v, d);
        int8_t *pc = planes + (i / WO4_CHUNK) * WO4_PLANE_BYTES + (i % WO4_CHUNK) / 2;
        for (int p = 0; p < 3; p++) {
            const __m128i b = _mm512_cvtepi32_epi8(_mm512_permutexvar_epi32(eo, d[p]));
            _mm_storel_epi64((__m128i *)(pc + (2 - p) * 128), b);
            _mm_storel_epi64((__m128i *)(pc + (2 - p) * 128 + 64), _mm_unpackhi_epi64(b, b));
        }
        int32_t *ql = Q + (i / WO4_CHUNK) * 16 + (i % WO4_CHUNK) / 8; /* |Q| <= 8 WO_QMAX */
        ql[0] = _mm512_mask_reduce_add_epi32((__mmask16)0x00FF, v);
        ql[1] = _mm512_mask_reduce_add_epi32((__mmask16)0xFF00, v);
    }
    return 0;
}
#endif

/* Whether groups of g inputs (a multiple of 32) map onto the lanes of a 128-input chunk simply:
 * 32 or 64 (4 or 2 groups a chunk, lane l in group l / (16 / groups)), a multiple of 128 or one
 * group a row. */
static int wo4_groups_ok(int64_t g, int64_t G) {
    return g % 32 == 0 && (g == 32 || g == 64 || g % WO4_CHUNK == 0 || G == 1);
}

#ifdef __x86_64__
/* One 128-input chunk c of R rows into acc: GPC (1, 2 or 4) groups a chunk, g0 the first; ZP:
 * zero points from zp (else zq = zp_const * Q); TAIL: the chunk is the row's last, partial one
 * (masked loads: tail bytes of codes, ng groups). */
__attribute__((always_inline, target("avx512f,avx512bw,avx512vnni"))) static inline void
lut4_chunk(const uint8_t *w, int64_t row_bytes, const float *s, const uint8_t *zp, int64_t G,
           const int8_t *pl, const int32_t *Qc, __m512i zq, int64_t g0, const int R,
           const int GPC, const int ZP, const int TAIL, __mmask64 tail, int ng, __m512 *acc) {
    const __m512i nib = _mm512_set1_epi8(15);
    /* a << 8 in every int32 lane as a byte shuffle (port 5; the shifts share port 0 with
       vpdpbusd): byte k of a lane <- byte k - 1, byte 0 <- 0 (indices within 16 bytes) */
    const __m512i up8 = _mm512_broadcast_i32x4(_mm_setr_epi32(
        (int)0x020100FFu, (int)0x060504FFu, (int)0x0A0908FFu, (int)0x0E0D0CFFu));
    const __m512i gidx = _mm512_srli_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), GPC == 4 ? 2 : 3);
    const __mmask16 gm = TAIL ? (__mmask16)((1u << ng) - 1) : (__mmask16)((1u << GPC) - 1);
    const __m512i e2 = _mm512_loadu_si512((const void *)pl);
    const __m512i o2 = _mm512_loadu_si512((const void *)(pl + 64));
    const __m512i e1 = _mm512_loadu_si512((const void *)(pl + 128));
    const __m512i o1 = _mm512_loadu_si512((const void *)(pl + 192));
    const __m512i e0 = _mm512_loadu_si512((const void *)(pl + 256));
    const __m512i o0 = _mm512_loadu_si512((const void *)(pl + 320));
    const __m512i qv = _mm512_loadu_si512((const void *)Qc);
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        const uint8_t *wr = w + r * row_bytes;
        _mm_prefetch((const char *)(wr + R * row_bytes), _MM_HINT_T0); /* a tile ahead */
        const __m512i v = TAIL ? _mm512_maskz_loadu_epi8(tail, wr) : _mm512_loadu_si512((const void *)wr);
        const __m512i lo = _mm512_and_si512(v, nib);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
        __m512i a = _mm512_setzero_si512();
        DPBUSD(a, lo, e2);
        DPBUSD(a, hi, o2);
        a = _mm512_shuffle_epi8(a, up8);
        DPBUSD(a, lo, e1);
        DPBUSD(a, hi, o1);
        a = _mm512_shuffle_epi8(a, up8);
        DPBUSD(a, lo, e0);
        DPBUSD(a, hi, o0);
        __m512 sv;
        __m512i zv;
        if (GPC > 1) {
            sv = _mm512_permutexvar_ps(gidx, _mm512_maskz_loadu_ps(gm, s + r * G + g0));
            if (ZP)
                zv = _mm512_permutexvar_epi32(gidx, _mm512_cvtepu8_epi32(_mm512_castsi512_si128(
                                                        _mm512_maskz_loadu_epi8((__mmask64)gm, zp + r * G + g0))));
        } else {
            sv = _mm512_set1_ps(s[r * G + g0]);
            if (ZP) zv = _mm512_set1_epi32(zp[r * G + g0]);
        }
        a = _mm512_sub_epi32(a, ZP ? _mm512_mullo_epi32(qv, zv) : zq);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), sv, acc[r]);
    }
}

/* R output rows of "lsb" 4-bit codes (w + r * row_bytes, scales s + r * G, zero points zp +
 * r * G or zp_const) x one split activation row: out[r] = sum_i s (c - zp) q_i (before sx). */
__attribute__((always_inline, target("avx512f,avx512bw,avx512vnni"))) static inline void
lut4_vnni_impl(const uint8_t *w, int64_t row_bytes, const float *s, const uint8_t *zp,
               int zp_const, int64_t G, int64_t g, int64_t I, const int8_t *planes,
               const int32_t *Q, const int R, const int GPC, const int ZP, float *out) {
    const int64_t n_full = I / WO4_CHUNK;
    const __mmask64 tail = (((__mmask64)1) << ((I % WO4_CHUNK) / 2)) - 1;
    __m512 acc[WO_TR];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c < n_full; c++) {
        const int8_t *pl = planes + c * WO4_PLANE_BYTES;
        const __m512i zq = ZP ? _mm512_setzero_si512()
                              : _mm512_mullo_epi32(_mm512_loadu_si512((const void *)(Q + 16 * c)),
                                                   _mm512_set1_epi32(zp_const));
        lut4_chunk(w + 64 * c, row_bytes, s, zp, G, pl, Q + 16 * c, zq,
                   GPC > 1 ? c * GPC : c * WO4_CHUNK / g, R, GPC, ZP, 0, 0, GPC, acc);
    }
    if (c * WO4_CHUNK < I) {
        const int64_t g0 = GPC > 1 ? c * GPC : c * WO4_CHUNK / g;
        const __m512i zq = _mm512_mullo_epi32(_mm512_loadu_si512((const void *)(Q + 16 * c)),
                                              _mm512_set1_epi32(zp_const));
        lut4_chunk(w + 64 * c, row_bytes, s, zp, G, planes + c * WO4_PLANE_BYTES, Q + 16 * c, zq,
                   g0, R, GPC, ZP, 1, tail, (int)(GPC > 1 ? G - g0 : 1), acc);
    }
    for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}

VNNI_TARGET static void lut4_vnni_tile(const uint8_t *w, int64_t row_bytes, const float *s,
                                       const uint8_t *zp, int zp_const, int64_t G, int64_t g,
                                       int64_t I, const int8_t *planes, const int32_t *Q, int R,
                                       float *out) {
    const int gpc = g == 32 ? 4 : g == 64 ? 2 : 1;
#define L4(r_, gpc_, zp_) lut4_vnni_impl(w, row_bytes, s, zp, zp_const, G, g, I, planes, Q, r_, gpc_, zp_, out)
#define L4R(r_)                                                                                  \
    if (zp) { if (gpc == 4) L4(r_, 4, 1); else if (gpc == 2) L4(r_, 2, 1); else L4(r_, 1, 1); } \
    else { if (gpc == 4) L4(r_, 4, 0); else if (gpc == 2) L4(r_, 2, 0); else L4(r_, 1, 0); }
    if (R == WO_TR) { L4R(WO_TR) } else { L4R(1) }
#undef L4R
#undef L4
}

/* Whether the zero points of R rows (zp + r * G) all lie in 0..15 (|c - zp| <= 15: the lane
 * sums stay in int32). */
static int wo4_zp_ok(const uint8_t *zp, int zp_const, int64_t G, int R) {
    if (!zp) return zp_const >= 0 && zp_const <= 15;
    uint8_t m = 0;
    for (int64_t k = 0; k < R * G; k++) m |= zp[k];
    return m <= 15;
}

/* y = x W^T + bias for B (<= WO4_VNNI_MAX_ROWS) rows of 4-bit "lsb" codes. A tile whose zero
 * points exceed 15 takes the float lookup on its own deinterleaved copy of the row (files written
 * by qdistill keep zero points in 0..15). Returns 0; 1 (y untouched: the caller takes the float
 * path) if x holds NaN / Inf or the planes cannot be allocated; -1 if such a copy could not be. */
static int lut4_vnni_gemm(const uint8_t *w, const float *s, const uint8_t *zp, int zp_const,
                          const float *x, const float *bias, float *y, int64_t B, int64_t O,
                          int64_t I, int64_t g) {
    const int64_t G = I / g, cpg = g / 32, row_bytes = I / 2;
    const int64_t n_chunks = (I + WO4_CHUNK - 1) / WO4_CHUNK;
    int8_t *planes = (int8_t *)malloc((size_t)(B * n_chunks * (WO4_PLANE_BYTES + 64)));
    if (!planes) return 1;
    int32_t *Q = (int32_t *)(planes + B * n_chunks * WO4_PLANE_BYTES); /* 64-byte multiples */
    double sx[WO4_VNNI_MAX_ROWS];
    int failed = 0;
    for (int64_t b = 0; b < B; b++)
        if (wo4_split_row(x + b * I, I, n_chunks, planes + b * n_chunks * WO4_PLANE_BYTES,
                          Q + b * n_chunks * 16, sx + b)) {
            free(planes);
            return 1;
        }
#pragma omp parallel for schedule(static) if (B * O * I >= PARALLEL_MIN_WORK)
    for (int64_t t = 0; t < (O + WO_TR - 1) / WO_TR; t++) {
        const int64_t o_end = (t + 1) * WO_TR < O ? (t + 1) * WO_TR : O;
        for (int64_t o = t * WO_TR; o < o_end;) {
            const int R = o_end - o >= WO_TR ? WO_TR : 1;
            const uint8_t *zo = zp ? zp + o * G : NULL;
            const int exact = wo4_zp_ok(zo, zp_const, G, R);
            for (int64_t b = 0; b < B; b++) {
                float out[WO_TR * NB];
                if (exact) {
                    lut4_vnni_tile(w + o * row_bytes, row_bytes, s + o * G, zo, zp_const, G, g, I,
                                   planes + b * n_chunks * WO4_PLANE_BYTES, Q + b * n_chunks * 16,
                                   R, out);
                    for (int r = 0; r < R; r++)
                        y[b * O + o + r] = (float)((double)out[r] * sx[b]) + (bias ? bias[o + r] : 0.0f);
                } else {
                    float *xd = (float *)malloc((size_t)I * sizeof(float));
                    if (!xd) {
#pragma omp atomic write
                        failed = 1;
                        continue;
                    }
                    deinterleave(x + b * I, xd, 1, I, 2);
                    const float *xs[NB] = {xd, xd, xd, xd};
                    lut_tile_avx512(w + o * row_bytes, row_bytes, s + o * G, zo, zp_const, 4, xs,
                                    G, cpg, R, 1, out);
                    free(xd);
                    for (int r = 0; r < R; r++)
                        y[b * O + o + r] = out[r * NB] + (bias ? bias[o + r] : 0.0f);
                }
            }
            o += R;
        }
    }
    free(planes);
    return failed ? -1 : 0;
}
#endif

/* y[b, o] = sum_i ((c[o, i] - zp[o, g(i)]) * s[o, g(i)]) x[b, i] + bias[o]
 * w: [O][I * bits / 8] lsb codes; s: [O][G]; zp: [O][G] or NULL (then zp_const for all). */
int qd_lut_gemm(const uint8_t *w, const float *s, const uint8_t *zp, int zp_const, int bits,
                const float *x, const float *bias, float *y, int64_t B, int64_t O, int64_t I,
                int64_t g, int level) {
    int per = 8 / bits;
    int64_t G = I / g, cpg = g / (16 * per), row_bytes = I * bits / 8;
    if (B <= 0 || O <= 0) return 0;
#ifdef __x86_64__
    if (B >= (wo_wide(level) ? WO_PANEL_MIN_ROWS_TILED : WO_PANEL_MIN_ROWS) && level != 1 &&
        has_avx2()) {
        const wo_weight W = {1, w, s, zp, zp_const, bits, I, G, cpg, row_bytes};
        if (wo_panel_gemm(&W, x, bias, y, B, O, wo_wide(level)) == 0) return 0;
    }
#endif
#ifdef __x86_64__
    if (level == 0 && bits == 4 && B <= WO4_VNNI_MAX_ROWS && wo_wide(level) && has_vnni() &&
        wo4_groups_ok(g, G)) {
        const int status = lut4_vnni_gemm(w, s, zp, zp_const, x, bias, y, B, O, I, g);
        if (status != 1) return status; /* -1: the caller raises MemoryError */
    }
#endif
    float *xd = (float *)malloc((size_t)(B * I) * sizeof(float));
    if (!xd) return -1; /* y untouched: the caller raises MemoryError */
    deinterleave(x, xd, B, I, per);
#ifdef __x86_64__
    if (wo_wide(level)) {
#pragma omp parallel for schedule(static) if (B * O * I >= PARALLEL_MIN_WORK)
        for (int64_t t = 0; t < (O + WO_TR - 1) / WO_TR; t++) {
            const int64_t o_end = (t + 1) * WO_TR < O ? (t + 1) * WO_TR : O;
            for (int64_t o = t * WO_TR; o < o_end;) {
                const int R = o_end - o >= WO_TR ? WO_TR : 1;
                for (int64_t b0 = 0; b0 < B; b0 += NB) {
                    int nb = B - b0 < NB ? (int)(B - b0) : NB;
                    const float *xs[NB];
                    float out[WO_TR * NB];
                    for (int b = 0; b < NB; b++) xs[b] = xd + (b0 + (b < nb ? b : 0)) * I;
                    lut_tile_avx512(w + o * row_bytes, row_bytes, s + o * G, zp ? zp + o * G : NULL,
                                    zp_const, bits, xs, G, cpg, R, nb, out);
                    for (int r = 0; r < R; r++)
                        for (int b = 0; b < nb; b++)
                            y[(b0 + b) * O + o + r] = out[r * NB + b] + (bias ? bias[o + r] : 0.0f);
                }
                o += R;
            }
        }
        free(xd);
        return 0;
    }
    const int fast2 = level != 1 && has_avx2(); /* the AVX-512 CPUs took the tiles above */
#endif
#pragma omp parallel for schedule(static) if (B * O * I >= PARALLEL_MIN_WORK)
    for (int64_t o = 0; o < O; o++) {
        const uint8_t *wr = w + o * row_bytes;
        const float *so = s + o * G;
        const uint8_t *zo = zp ? zp + o * G : NULL;
        for (int64_t b0 = 0; b0 < B; b0 += NB) {
            int nb = B - b0 < NB ? (int)(B - b0) : NB;
            const float *xs[NB];
            float out[NB];
            for (int b = 0; b < NB; b++) xs[b] = xd + (b0 + (b < nb ? b : 0)) * I;
#ifdef __x86_64__
            if (fast2)
                lut_row_avx2(wr, so, zo, zp_const, bits, xs, G, cpg, nb, out);
            else
#endif
                lut_row_c(wr, so, zo, zp_const, bits, xs, G, cpg, nb, out);
            for (int b = 0; b < nb; b++) y[(b0 + b) * O + o] = out[b] + (bias ? bias[o] : 0.0f);
        }
    }
    free(xd);
    return 0;
}

/* y[b, o] = sum_i (w[o, i] * s[o]) x[b, i] + bias[o], int8 w (code - 128), float x */
void qd_int8w_gemm(const int8_t *w, const float *w_scale, const float *x, const float *bias,
                   float *y, int64_t B, int64_t O, int64_t I, int level) {
#ifdef __x86_64__
    if (B >= WO_PANEL_MIN_ROWS_TILED && level != 1 && has_avx2()) {
        const wo_weight W = {0, w, w_scale, NULL, 0, 8, I, 1, 1, I};
        if (wo_panel_gemm(&W, x, bias, y, B, O, wo_wide(level)) == 0) return;
    }
    if (level == 0 && has_vnni() && B <= WO_VNNI_MAX_ROWS && I <= WO_VNNI_MAX_I &&
        i8w_vnni_gemm(w, w_scale, x, bias, y, B, O, I) == 0)
        return;
    const int wide = wo_wide(level);
    if (wide || (level != 1 && has_avx2())) {
#pragma omp parallel for schedule(static) if (B * O * I >= PARALLEL_MIN_WORK)
        for (int64_t t = 0; t < (O + WO_TR - 1) / WO_TR; t++) {
            const int64_t o_end = (t + 1) * WO_TR < O ? (t + 1) * WO_TR : O;
            for (int64_t o = t * WO_TR; o < o_end;) {
                /* AVX2: 2 output rows a tile from 3 batch rows on (16 registers) */
                const int64_t left = o_end - o, nb0 = B < NB ? B : NB;
                const int R = left >= WO_TR && (wide || nb0 <= 2) ? WO_TR
                              : left >= 2 && !wide && nb0 > 2 ? 2 : 1;
                for (int64_t b0 = 0; b0 < B; b0 += NB) {
                    int nb = B - b0 < NB ? (int)(B - b0) : NB;
                    const float *xs[NB];
                    float out[WO_TR * NB];
                    for (int b = 0; b < NB; b++) xs[b] = x + (b0 + (b < nb ? b : 0)) * I;
                    if (wide) i8w_tile_avx512(w + o * I, I, R, w_scale + o, xs, nb, out);
                    else i8w_tile_avx2(w + o * I, I, R, w_scale + o, xs, nb, out);
                    for (int r = 0; r < R; r++)
                        for (int b = 0; b < nb; b++)
                            y[(b0 + b) * O + o + r] = out[r * NB + b] + (bias ? bias[o + r] : 0.0f);
                }
                o += R;
            }
        }
        return;
    }
#endif
    /* portable C (level 1, or a CPU without AVX2) */
#pragma omp parallel for schedule(static) if (B * O * I >= PARALLEL_MIN_WORK)
    for (int64_t o = 0; o < O; o++) {
        const int8_t *wr = w + o * I;
        for (int64_t b0 = 0; b0 < B; b0 += NB) {
            int nb = B - b0 < NB ? (int)(B - b0) : NB;
            const float *xs[NB];
            float out[NB];
            for (int b = 0; b < NB; b++) xs[b] = x + (b0 + (b < nb ? b : 0)) * I;
            for (int b = 0; b < nb; b++) {
                float acc = 0.0f;
                for (int64_t i = 0; i < I; i++) acc += ((float)wr[i] * w_scale[o]) * xs[b][i];
                out[b] = acc;
            }
            for (int b = 0; b < nb; b++) y[(b0 + b) * O + o] = out[b] + (bias ? bias[o] : 0.0f);
        }
    }
}

/* Dequantize row o of a weight stored in the file's own layout (rows of K codes, row-major)
 * into dst: dst[i] = (float)(c * mul - zp) * scale[bucket], where c is code n = o * K + i,
 * bucket = n / G (G = K: per output channel; G = O * K: per tensor; else the group size), zp =
 * zp_arr[bucket] or zp_const. bits 1..8: the "lsb" bit stream (code n in bits n*bits ..);
 * bits 0: base-3 trits, five a byte (byte = c0 + 3 c1 + 9 c2 + 27 c3 + 81 c4). n_bytes bounds
 * every read. Storage with a float zero point per bucket (Polino's min-max: value = beta +
 * alpha * c / levels) passes div (the integer level is divided by it in fp32; 1: no division)
 * and zf (added last; NULL: none). The arithmetic is the formats' own (integer shift, one fp32
 * division, multiply and add, never fused: -ffp-contract=off), so the result equals their
 * dequantize() exactly. */
static void dequant_row(const uint8_t *codes, int64_t n_bytes, int bits, int mul,
                        const float *scale, const uint8_t *zp_arr, int zp_const, int div,
                        const float *zf, int64_t o, int64_t K, int64_t G, float *dst) {
    static const uint8_t pow3[5] = {1, 3, 9, 27, 81};
    const uint32_t mask = bits ? (1u << bits) - 1u : 0u;
    int64_t n = o * K, bucket = n / G, left = G - n % G;
    for (int64_t i = 0; i < K; i++, n++) {
        uint32_t c;
        if (bits == 0) {
            c = (uint32_t)(codes[n / 5] / pow3[n % 5]) % 3u;
        } else if (bits == 8) {
            c = codes[n];
        } else {
            int64_t bit = n * bits, byte = bit >> 3;
            uint32_t v = codes[byte];
            if (byte + 1 < n_bytes) v |= (uint32_t)codes[byte + 1] << 8;
            c = (v >> (bit & 7)) & mask;
        }
        int32_t zp = zp_arr ? (int32_t)zp_arr[bucket] : zp_const;
        float level = (float)((int32_t)c * mul - zp);
        if (div != 1) level = level / (float)div;
        dst[i] = level * scale[bucket];
        if (zf) dst[i] = zf[bucket] + dst[i];
        if (--left == 0) {
            bucket++;
            left = G;
        }
    }
}

/* Rows o0 .. o1 - 1 into out [o1 - o0, K] (Conv2d tiles). */
void qd_dequant_rows(const uint8_t *codes, int64_t n_bytes, int bits, int mul, const float *scale,
                     const uint8_t *zp_arr, int zp_const, int div, const float *zf, int64_t o0,
                     int64_t o1, int64_t K, int64_t G, float *out) {
#pragma omp parallel for schedule(static) if ((o1 - o0) * K >= PARALLEL_MIN_WORK)
    for (int64_t o = o0; o < o1; o++)
        dequant_row(codes, n_bytes, bits, mul, scale, zp_arr, zp_const, div, zf, o, K, G,
                    out + (o - o0) * K);
}

/* Rows idx[0 .. n_idx - 1] into out [n_idx, K] (Embedding lookups; indices checked by the
 * caller to lie in 0 .. O - 1). */
void qd_dequant_gather(const uint8_t *codes, int64_t n_bytes, int bits, int mul,
                       const float *scale, const uint8_t *zp_arr, int zp_const, int div,
                       const float *zf, const int64_t *idx, int64_t n_idx, int64_t K, int64_t G,
                       float *out) {
#pragma omp parallel for schedule(static) if (n_idx * K >= PARALLEL_MIN_WORK)
    for (int64_t r = 0; r < n_idx; r++)
        dequant_row(codes, n_bytes, bits, mul, scale, zp_arr, zp_const, div, zf, idx[r], K, G,
                    out + r * K);
}

/* One C call per layer for the per-token int8 paths (#15 item 4): quantize the float rows x
 * [B][I] (as qd_quantize_rows, into scratch memory of this call), then the layer's product
 * with its scales and bias into y [B][O]. kind 0: ternary / 2-bit (w tile16x16, zp int32 per
 * row or NULL, I_pad a multiple of 16), 1: int8 (wsum), 2: int4 (w tile16, w_scale / zp
 * [ceil(O/16)][I/g][16], g the group size). Everything but x, y and B is fixed when the layer's
 * plan is made, so the caller keeps the arguments ready and passes three per call.
 * Returns 0, the number of rows holding NaN / Inf (y untouched: the caller raises, naming
 * them after rerunning qd_quantize_rows), or -1 when an allocation failed. */
int64_t qd_a8_linear(int kind, const void *w, const float *w_scale, const void *zp,
                     const int32_t *wsum, const float *bias, int64_t O, int64_t I, int64_t I_pad,
                     int64_t g, float eps, const float *x, float *y, int64_t B, int level) {
    if (B <= 0 || O <= 0) return 0;
    /* scales and sums first: 4-byte aligned for any I_pad */
    char *buf = (char *)malloc((size_t)B * (8 + (size_t)I_pad));
    if (!buf) return -1;
    float *x_scale = (float *)buf;
    int32_t *rowsum = (int32_t *)(buf + 4 * B);
    int8_t *xq = (int8_t *)(buf + 8 * B);
    int64_t status = qd_quantize_rows(x, xq, x_scale, rowsum, B, I, I_pad, eps, level);
    if (status == 0) {
        if (kind == 0)
            qd_ternary_gemm((const uint8_t *)w, xq, rowsum, (const int32_t *)zp, x_scale, w_scale,
                            bias, y, B, O, I_pad, level);
        else if (kind == 1) {
            int flip = B > 1 && pick(level) == 2; /* the VNNI GEMM takes u8 codes */
            if (flip)
                for (int64_t i = 0; i < B * I_pad; i++) xq[i] = (int8_t)((uint8_t)xq[i] ^ 0x80u);
            int8_gemm((const int8_t *)w, xq, wsum, x_scale, w_scale, bias, y, B, O, I_pad, level,
                      flip);
        }
        else
            status = qd_int4_gemm((const uint8_t *)w, w_scale, (const uint8_t *)zp, xq, x_scale,
                                  bias, y, B, O, I, g, level);
    }
    free(buf);
    return status;
}

/* qd_a8_linear's fixed arguments in one struct, filled once per layer (kernels.A8Plan mirrors
 * it field for field): a call then converts 5 arguments instead of 15. */
typedef struct {
    int64_t kind;
    const void *w;
    const float *w_scale;
    const void *zp;
    const int32_t *wsum;
    const float *bias;
    int64_t O, I, I_pad, g;
    float eps;
    const int8_t *amx_w; /* NULL: no AMX; int8: the weights in AMX's B-tile layout
                          * (qd_amx_pack_int8); ternary, int4: w itself (expanded per call) */
} qd_a8_plan;

/* level as in pick(), and 3: as 0 without AMX; 4: as 0 with AMX at any row count (the tests
 * and benchmarks compare them) */
int64_t qd_a8_run(const qd_a8_plan *p, const float *x, float *y, int64_t B, int level) {
#ifdef QD_AMX
    int64_t amx_min = p->O * p->I <= AMX_SMALL_WEIGHTS ? AMX_MIN_ROWS_SMALL : AMX_MIN_ROWS;
    if ((level == 4 || (level == 0 && B >= amx_min)) && p->kind == 1 && p->amx_w && has_amx())
        return int8_amx_linear(p->amx_w, p->w_scale, p->bias, p->O, p->I, p->eps, x, y, B, 0,
                               NULL, NULL, 0);
    if ((level == 4 || (level == 0 && B >= TERN_AMX_MIN_ROWS)) && p->kind == 0 && p->amx_w &&
        has_amx())
        return int8_amx_linear(NULL, p->w_scale, p->bias, p->O, p->I, p->eps, x, y, B, 0,
                               (const uint8_t *)p->w, (const int32_t *)p->zp, p->I_pad);
    if ((level == 4 || (level == 0 && B >= INT4_AMX_MIN_ROWS)) && p->kind == 2 && p->amx_w &&
        p->g % AMX_KSTEP == 0 && p->I % p->g == 0 && has_amx())
        return int4_amx_linear((const uint8_t *)p->w, p->w_scale, (const uint8_t *)p->zp,
                               p->bias, p->O, p->I, p->g, p->eps, x, y, B);
#endif
    if (level >= 3) level = 0;
    if (p->kind == 1 && p->amx_w && p->amx_w == (const int8_t *)p->w) /* one copy: B tiles */
        return int8_tiles_linear(p->amx_w, p->wsum, p->w_scale, p->bias, p->O, p->I, p->eps, x,
                                 y, B, level);
    return qd_a8_linear((int)p->kind, p->w, p->w_scale, p->zp, p->wsum, p->bias, p->O, p->I,
                        p->I_pad, p->g, p->eps, x, y, B, level);
}

/* The weight-only paths' fixed arguments in one struct, filled once per layer (kernels.WOPlan
 * mirrors it field for field; #15 item 4): kind 0: qd_lut_gemm (4 / 2-bit codes, zp per row or
 * group or NULL, zp_const, bits, g), 1: qd_int8w_gemm. A call passes the plan, x [B][I], y
 * [B][O], B and level, with the same signature as qd_a8_run, so that both take one per-call
 * path in Python. Returns 0, or -1 when an allocation failed. */
typedef struct {
    int64_t kind;
    const void *w;
    const float *w_scale;
    const uint8_t *zp;
    const float *bias;
    int64_t O, I, g, zp_const, bits;
} qd_wo_plan;

int64_t qd_wo_run(const qd_wo_plan *p, const float *x, float *y, int64_t B, int level) {
    if (p->kind == 0)
        return qd_lut_gemm((const uint8_t *)p->w, p->w_scale, p->zp, (int)p->zp_const,
                           (int)p->bits, x, p->bias, y, B, p->O, p->I, p->g, level)
                   ? -1
                   : 0;
    qd_int8w_gemm((const int8_t *)p->w, p->w_scale, x, p->bias, y, B, p->O, p->I, level);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * A run of packed Linears in one call (#15 items 1 and 4; qdistill/pack/chain.py). At batch 1
 * the Python module path between the kernels (nn.Module.__call__, checks, torch.empty, a ReLU
 * as a torch op) costs ~300 us of a ~1.3 ms W4A8 forward once a larger model has evicted its
 * code and data from the caches (benchmarks/results/kernels-gemv.md, section 6). A chain is the
 * plans of consecutive Linears of an nn.Sequential with the elementwise layers between them
 * that C computes bit for bit as torch does (ReLU; Identity and eval-mode Dropout are no-ops):
 * one call runs them layer after layer through the same entries (qd_a8_run / qd_wo_run) into
 * two ping-pong scratch buffers, so every product is exactly the unfused one.
 * ------------------------------------------------------------------------------------------- */
typedef struct {
    const void *plan; /* a qd_a8_plan (entry 0) or a qd_wo_plan (entry 1) */
    int64_t entry;
    int64_t act; /* on this layer's output: 0 none, 1 ReLU (as torch.relu) */
    int64_t O;   /* output width */
} qd_chain_layer;

/* qdistill/pack/chain.py's CChain / CChainLayer mirror these field for field */
typedef struct {
    int64_t n;
    const qd_chain_layer *layers;
} qd_chain;

/* torch.relu's bits: x < 0 -> +0.0; NaN (any payload), -0.0 and +-Inf >= 0 stay as they are */
static void chain_relu(float *y, int64_t n) {
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN_WORK / 16)
    for (int64_t i = 0; i < n; i++) y[i] = y[i] < 0.0f ? 0.0f : y[i];
}

/* x [B][I of layer 0] -> y [B][O of the last layer], level as qd_a8_run's. Returns 0; -1 when
 * an allocation failed; else the first failing layer's status (> 0: rows holding NaN / Inf at
 * a per-token int8 layer). On failure y is unspecified: the caller runs the layers one by one
 * again, which raises the layer's own error. */
int64_t qd_chain_run(const qd_chain *c, const float *x, float *y, int64_t B, int level) {
    if (B <= 0 || c->n <= 0) return 0;
    int64_t width = 0;
    for (int64_t i = 0; i + 1 < c->n; i++)
        if (c->layers[i].O > width) width = c->layers[i].O;
    /* two buffers on 64-byte lines, as torch allocates the tensors the unfused layers read
     * (a probe found no difference at 16-byte alignment; kept so both paths see the same) */
    const size_t stride = ((size_t)B * (size_t)width + 15) & ~(size_t)15;
    char *mem = NULL;
    float *buf = NULL;
    if (width > 0) {
        mem = (char *)malloc(2 * stride * sizeof(float) + 64);
        if (!mem) return -1;
        buf = (float *)(mem + (64 - (uintptr_t)mem % 64) % 64);
    }
    const float *in = x;
    int64_t status = 0;
    for (int64_t i = 0; i < c->n && status == 0; i++) {
        const qd_chain_layer *L = &c->layers[i];
        float *out = i + 1 == c->n ? y : buf + (size_t)(i & 1) * stride;
        status = L->entry == 0 ? qd_a8_run((const qd_a8_plan *)L->plan, in, out, B, level)
                               : qd_wo_run((const qd_wo_plan *)L->plan, in, out, B, level);
        if (status == 0 && L->act == 1) chain_relu(out, B * L->O);
        in = out;
    }
    free(mem);
    return status;
}

/* ---------------------------------------------------------------------------------------------
 * Attention for short sequences (#15 "transformers that actually run faster"; helper attn).
 * softmax(scale * q k^T + mask) v for q [B][H][Sq][D], k and v [B][Hkv][Sk][D] (GQA: head h
 * reads kv head h / (H / Hkv)), any strides but a contiguous last dimension (HF passes
 * x.view(b, s, h, d).transpose(1, 2)); out is contiguous [B][Sq][H][D], the layout HF's
 * attention functions return, so the reshape that follows costs nothing.
 *
 * torch's scaled_dot_product_attention spends 91-196 us on (1, 12, 40, 32) on the 2-core
 * Sapphire Rapids VM for ~1.2 M multiply-adds (benchmarks/attention_ab.py); here one call does, per (b, h, query chunk):
 *   1. K (the keys the chunk may see) transposed into kt [D][Sk rounded up to 16] with 16 x 16
 *      (AVX-512) / 8 x 8 (AVX2) register transposes, so that
 *   2. scores for 8 queries x 48 keys (AVX2: 4 x 16) are a register tile: per d one load of kt
 *      per 16 keys and one broadcast per query (the outer-product GEMM micro-kernel);
 *   3. mask / causal / padding applied to the score rows as they are loaded, softmax in fp32
 *      with the row maximum subtracted (exp: Cephes' expf polynomial on r = x - n ln2, times 2^n);
 *   4. out rows = (p v) / sum p: 8 queries x 32 dims (AVX2: 4 x 16) in registers, one broadcast
 *      of p and one load of v per 16 dims (v copied to contiguous rows first, see att_copy_v).
 * mask_kind: 0 none, 1 additive float32, 2 bool / uint8 (nonzero = attend), read through the
 * strides (0 broadcasts a dimension). causal: key j is masked for query i when j > i + Sk - Sq
 * (bottom-right: the queries are the last Sq positions; torch's is_causal is the same for
 * Sq == Sk). Rows whose every key is masked give 0, as torch 2.13's sdpa does (its math and
 * default paths, with -inf or bool masks); NaN in q, k, v or mask gives NaN (never finite
 * garbage): a NaN score makes its row's sum NaN.
 * Threads: OpenMP over (b, h, query chunk) items; heads are split into chunks only when there
 * are fewer than 8 items a thread; under ATT_PARALLEL_MIN multiply-adds one thread runs it.
 * ------------------------------------------------------------------------------------------- */
#ifdef _OPENMP
#include <omp.h>
#endif

#define ATT_R 4                     /* queries per register tile (AVX2) */
#define ATT_RB 8                    /* queries per block (AVX-512 tiles; chunks a multiple) */
/* B H Sq Sk D below this: one thread. The file's PARALLEL_MIN_WORK: on the 2-vCPU VM a second
 * thread gave (1, 12, 40, 32) nothing (52 us with OMP_WAIT_POLICY=passive, 42-53 us on one
 * thread) and cost 0.6-4 ms a call with libgomp's default spinning; 614 K stays on one. */
#define ATT_PARALLEL_MIN (1 << 20)

typedef struct {
    const float *q, *k, *v;
    const void *mask;
    float *out;
    int64_t B, H, Hkv, Sq, Sk, D;
    const int64_t *st; /* q b,h,s; k b,h,s; v b,h,s; mask b,h,q,k */
    int mask_kind, causal;
    float scale;
} att_args;

static inline int64_t att_round16(int64_t n) { return (n + 15) & ~(int64_t)15; }

/* keys [0, n) query i may see (before the mask): Sk, or fewer when causal */
static inline int64_t att_kend(const att_args *a, int64_t i) {
    if (!a->causal) return a->Sk;
    int64_t e = i + a->Sk - a->Sq + 1;
    return e < 0 ? 0 : e > a->Sk ? a->Sk : e;
}

/* Score row s[0, n_pad) of query i: masked keys -inf, keys >= the row's limit -inf. */
static inline __attribute__((always_inline)) void att_fix_row(const att_args *a, float *s,
                                                              int64_t b, int64_t h, int64_t i,
                                                              int64_t n_pad) {
    const int64_t lim = att_kend(a, i);
    const int64_t *ms = a->st + 9;
    if (a->mask_kind == 1) {
        const float *m = (const float *)a->mask + b * ms[0] + h * ms[1] + i * ms[2];
        if (ms[3] == 1)
            for (int64_t j = 0; j < lim; j++) s[j] += m[j];
        else
            for (int64_t j = 0; j < lim; j++) s[j] += m[j * ms[3]];
    } else if (a->mask_kind == 2) {
        const uint8_t *m = (const uint8_t *)a->mask + b * ms[0] + h * ms[1] + i * ms[2];
        for (int64_t j = 0; j < lim; j++)
            if (!m[j * ms[3]]) s[j] = -INFINITY;
    }
    for (int64_t j = lim; j < n_pad; j++) s[j] = -INFINITY;
}

/* After the row maximum m is known: 1 when the row has no finite score and no NaN (every key
 * masked: output 0), 0 otherwise. */
static int att_all_masked(const float *s, int64_t n, float m) {
    if (m != -INFINITY) return 0;
    for (int64_t j = 0; j < n; j++)
        if (s[j] != s[j]) return 0;
    return 1;
}

/* v rows [0, n) of one kv head into vc [n][ldv], contiguous: read in place (rows h * D floats
 * apart, like q's and out's), the rows of q, k, v and out of one head fall into the same few L1
 * sets and evict each other while the 4-query tiles re-read v (measured: the products with v
 * took 45% of the kernel's time, more than those with k, which were already contiguous; the
 * copy alone did not show in an interleaved A/B on the loaded VM, 8-query tiles then did) */
static void att_copy_v(const float *vb, int64_t vs, int64_t n, int64_t D, int64_t ldv, float *vc) {
    for (int64_t j = 0; j < n; j++) memcpy(vc + j * ldv, vb + j * vs, (size_t)D * sizeof(float));
}

static float *att_out_row(const att_args *a, int64_t b, int64_t h, int64_t i) {
    return a->out + ((b * a->Sq + i) * a->H + h) * a->D;
}

/* ---- portable C ---- */
static void att_item_c(const att_args *a, int64_t b, int64_t h, int64_t i0, int64_t i1,
                       float *sc) {
    const int64_t *st = a->st;
    const int64_t kvh = h / (a->H / a->Hkv), D = a->D;
    const float *kb = a->k + b * st[3] + kvh * st[4];
    const float *vb = a->v + b * st[6] + kvh * st[7];
    for (int64_t i = i0; i < i1; i++) {
        const float *qi = a->q + b * st[0] + h * st[1] + i * st[2];
        const int64_t n = att_kend(a, i);
        for (int64_t j = 0; j < n; j++) {
            const float *kj = kb + j * st[5];
            float acc = 0.0f;
            for (int64_t d = 0; d < D; d++) acc += qi[d] * kj[d];
            sc[j] = acc * a->scale;
        }
        att_fix_row(a, sc, b, h, i, n);
        float m = -INFINITY;
        for (int64_t j = 0; j < n; j++) m = sc[j] > m ? sc[j] : m;
        float *o = att_out_row(a, b, h, i);
        if (att_all_masked(sc, n, m)) {
            memset(o, 0, (size_t)D * sizeof(float));
            continue;
        }
        float sum = 0.0f;
        for (int64_t j = 0; j < n; j++) {
            sc[j] = expf(sc[j] - m);
            sum += sc[j];
        }
        const float inv = 1.0f / sum;
        for (int64_t d = 0; d < D; d++) o[d] = 0.0f;
        for (int64_t j = 0; j < n; j++) {
            const float *vj = vb + j * st[8];
            for (int64_t d = 0; d < D; d++) o[d] += sc[j] * vj[d];
        }
        for (int64_t d = 0; d < D; d++) o[d] *= inv;
    }
}

#ifdef __x86_64__
/* Cephes' expf: n = round(x log2 e), r = x - n ln2 (in two parts), e^r by a degree-6 polynomial */
#define ATT_EXP_C1 0.693359375f
#define ATT_EXP_C2 -2.12194440e-4f
#define ATT_EXP_POLY(FMA, SET, x, z)                                                               \
    FMA(FMA(FMA(FMA(FMA(SET(1.9875691500e-4f), x, SET(1.3981999507e-3f)), x,                      \
                    SET(8.3334519073e-3f)), x, SET(4.1665795894e-2f)), x, SET(1.6666665459e-1f)), \
        x, SET(5.0000001201e-1f))

/* ---- AVX-512 ---- */
#define ATT512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,fma")))

/* e^x for x <= 0 or NaN; x below -87 (and -inf) gives 0 (exp(-87) < 2^-125), NaN gives NaN.
 * Results are never denormal: an underflowing vscalefps takes a microcode assist (~35% of the
 * kernel's time on (1, 12, 40, 32), where the 8 padding keys of each row are -inf). */
ATT512_TARGET static inline __m512 att_exp512(__m512 x) {
    const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_NLT_UQ);
    x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x); /* NaN x: max returns x */
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(ATT_EXP_C1), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(ATT_EXP_C2), r);
    const __m512 z = _mm512_mul_ps(r, r);
    __m512 y = ATT_EXP_POLY(_mm512_fmadd_ps, _mm512_set1_ps, r, z);
    y = _mm512_fmadd_ps(y, z, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(y, n));
}

/* 16 rows (of 16 floats) transposed in registers */
ATT512_TARGET static inline __attribute__((always_inline)) void att_tr16(__m512 *r) {
    __m512 t[16];
    for (int p = 0; p < 8; p++) {
        t[2 * p] = _mm512_unpacklo_ps(r[2 * p], r[2 * p + 1]);
        t[2 * p + 1] = _mm512_unpackhi_ps(r[2 * p], r[2 * p + 1]);
    }
    for (int g = 0; g < 4; g++) { /* r[4g + c]: lane L holds rows 4g..4g+3 of column 4L + c */
        const __m512d lo0 = _mm512_castps_pd(t[4 * g]), hi0 = _mm512_castps_pd(t[4 * g + 1]);
        const __m512d lo1 = _mm512_castps_pd(t[4 * g + 2]), hi1 = _mm512_castps_pd(t[4 * g + 3]);
        r[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo0, lo1));
        r[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo0, lo1));
        r[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(hi0, hi1));
        r[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(hi0, hi1));
    }
    for (int c = 0; c < 4; c++) {
        const __m512 x = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88);
        const __m512 y = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xDD);
        const __m512 z = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
        const __m512 w = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xDD);
        t[c] = _mm512_shuffle_f32x4(x, z, 0x88);      /* column c */
        t[8 + c] = _mm512_shuffle_f32x4(x, z, 0xDD);  /* column 8 + c */
        t[4 + c] = _mm512_shuffle_f32x4(y, w, 0x88);  /* column 4 + c */
        t[12 + c] = _mm512_shuffle_f32x4(y, w, 0xDD); /* column 12 + c */
    }
    for (int c = 0; c < 16; c++) r[c] = t[c];
}

/* kt[d][j] = k row j, element d, for j < n (zeros up to ldk = n rounded up to 16) */
ATT512_TARGET static void att_kt512(const float *kb, int64_t ks, int64_t n, int64_t D,
                                    int64_t ldk, float *kt) {
    for (int64_t j0 = 0; j0 < ldk; j0 += 16)
        for (int64_t d0 = 0; d0 < D; d0 += 16) {
            const int64_t dn = D - d0 < 16 ? D - d0 : 16;
            const __mmask16 dm = (__mmask16)((1u << dn) - 1u);
            __m512 r[16];
            for (int p = 0; p < 16; p++)
                r[p] = j0 + p < n ? _mm512_maskz_loadu_ps(dm, kb + (j0 + p) * ks + d0)
                                  : _mm512_setzero_ps();
            att_tr16(r);
            for (int64_t c = 0; c < dn; c++) _mm512_storeu_ps(kt + (d0 + c) * ldk + j0, r[c]);
        }
}

/* sc[r][16 v ..] = scale * q_r . k_j for R query rows x NV vectors of 16 keys (R NV <= 24
 * accumulators: enough independent FMA chains to cover the FMA latency at 2 a cycle) */
ATT512_TARGET static inline __attribute__((always_inline)) void att_qk512_tile(
    const float *const *qr, const float *kt, int64_t ldk, int64_t D, float scale, float *sc,
    int64_t lds, const int R, const int NV) {
    __m512 acc[ATT_RB][4];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) acc[r][v] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d++) {
        __m512 kv[4];
        for (int v = 0; v < NV; v++) kv[v] = _mm512_loadu_ps(kt + d * ldk + 16 * v);
        for (int r = 0; r < R; r++) {
            const __m512 qb = _mm512_set1_ps(qr[r][d]);
            for (int v = 0; v < NV; v++) acc[r][v] = _mm512_fmadd_ps(qb, kv[v], acc[r][v]);
        }
    }
    const __m512 s = _mm512_set1_ps(scale);
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) _mm512_storeu_ps(sc + r * lds + 16 * v, _mm512_mul_ps(acc[r][v], s));
}

/* out rows (R queries) [16 NV) = sum_j p[r][j] v[j] * inv[r] (with TAIL the last vector masked) */
ATT512_TARGET static inline __attribute__((always_inline)) void att_pv512_tile(
    const float *p, int64_t lds, const float *vb, int64_t vs, int64_t n, __mmask16 last,
    float *const *orow, const float *inv, const int R, const int NV, const int TAIL) {
    __m512 acc[ATT_RB][4];
    if (!TAIL) last = (__mmask16)0xFFFF; /* constant: plain loads and stores */
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) acc[r][v] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j++) {
        __m512 vv[4];
        for (int v = 0; v < NV; v++)
            vv[v] = _mm512_maskz_loadu_ps(v + 1 == NV ? last : (__mmask16)0xFFFF, vb + j * vs + 16 * v);
        for (int r = 0; r < R; r++) {
            const __m512 pb = _mm512_set1_ps(p[r * lds + j]);
            for (int v = 0; v < NV; v++) acc[r][v] = _mm512_fmadd_ps(pb, vv[v], acc[r][v]);
        }
    }
    for (int r = 0; r < R; r++) {
        if (!orow[r]) continue;
        const __m512 s = _mm512_set1_ps(inv[r]);
        for (int v = 0; v < NV; v++)
            _mm512_mask_storeu_ps(orow[r] + 16 * v, v + 1 == NV ? last : (__mmask16)0xFFFF,
                                  _mm512_mul_ps(acc[r][v], s));
    }
}

/* Score row s[0, n_pad) of query i (n_pad a multiple of 16) into softmax numerators, in
 * vectors: keys past the row's limit (causal, padding) and masked keys become -inf as they are
 * loaded (scalar -inf stores followed by vector loads stalled store forwarding: ~7% of the
 * kernel), then e^(s - max). Returns 1 / sum, or 0 and *masked = 1 when every key is masked. */
/* att_row512 for rows of NV <= 4 vectors (short sequences: Sk <= 64): the row stays in
 * registers between the max and the exp (one store instead of a store, a load and a store) */
ATT512_TARGET static inline __attribute__((always_inline)) float att_row512_regs(
    float *s, int64_t lim, const float *mf, const uint8_t *mb, int *masked, const int NV) {
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __m512 x[4], mx = ninf;
    for (int v = 0; v < NV; v++) {
        const int64_t left = lim - 16 * v;
        const __mmask16 km = left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1u);
        x[v] = _mm512_mask_loadu_ps(ninf, km, s + 16 * v);
        if (mf) x[v] = _mm512_add_ps(x[v], _mm512_maskz_loadu_ps(km, mf + 16 * v));
        if (mb) {
            const __m128i bytes = _mm_maskz_loadu_epi8(km, mb + 16 * v);
            x[v] = _mm512_mask_mov_ps(ninf, _mm_test_epi8_mask(bytes, bytes), x[v]);
        }
        mx = _mm512_max_ps(x[v], mx); /* NaN x: max returns mx (ignored here, kept in the sum) */
    }
    const float m = _mm512_reduce_max_ps(mx);
    if (m == -INFINITY) {
        for (int v = 0; v < NV; v++) _mm512_storeu_ps(s + 16 * v, x[v]);
        *masked = att_all_masked(s, 16 * NV, m);
        if (*masked) return 0.0f;
    }
    const __m512 mv = _mm512_set1_ps(m);
    __m512 sum = _mm512_setzero_ps();
    for (int v = 0; v < NV; v++) {
        const __m512 e = att_exp512(_mm512_sub_ps(x[v], mv));
        _mm512_storeu_ps(s + 16 * v, e);
        sum = _mm512_add_ps(sum, e);
    }
    return 1.0f / _mm512_reduce_add_ps(sum);
}

ATT512_TARGET static float att_row512(const att_args *a, float *s, int64_t b, int64_t h,
                                      int64_t i, int64_t n_pad, int *masked) {
    const int64_t lim = att_kend(a, i);
    const int64_t *ms = a->st + 9;
    int kind = a->mask_kind;
    if (kind && ms[3] != 1) { /* a mask strided along the keys: scalar, then as unmasked */
        att_fix_row(a, s, b, h, i, lim);
        kind = 0;
    }
    const float *mf = kind == 1 ? (const float *)a->mask + b * ms[0] + h * ms[1] + i * ms[2] : NULL;
    const uint8_t *mb = kind == 2 ? (const uint8_t *)a->mask + b * ms[0] + h * ms[1] + i * ms[2] : NULL;
    *masked = 0;
    switch (n_pad) {
    case 16: return att_row512_regs(s, lim, mf, mb, masked, 1);
    case 32: return att_row512_regs(s, lim, mf, mb, masked, 2);
    case 48: return att_row512_regs(s, lim, mf, mb, masked, 3);
    case 64: return att_row512_regs(s, lim, mf, mb, masked, 4);
    default: break;
    }
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __m512 mx = ninf;
    for (int64_t j = 0; j < n_pad; j += 16) {
        const int64_t left = lim - j;
        const __mmask16 km = left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1u);
        __m512 x = _mm512_mask_loadu_ps(ninf, km, s + j);
        if (mf) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(km, mf + j));
        if (mb) {
            const __m128i bytes = _mm_maskz_loadu_epi8(km, mb + j);
            x = _mm512_mask_mov_ps(ninf, _mm_test_epi8_mask(bytes, bytes), x);
        }
        _mm512_storeu_ps(s + j, x);
        mx = _mm512_max_ps(x, mx); /* NaN x: max returns mx (ignored here, kept in the sum) */
    }
    const float m = _mm512_reduce_max_ps(mx);
    *masked = att_all_masked(s, n_pad, m);
    if (*masked) return 0.0f;
    const __m512 mv = _mm512_set1_ps(m);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n_pad; j += 16) {
        const __m512 e = att_exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), mv));
        _mm512_storeu_ps(s + j, e);
        sum = _mm512_add_ps(sum, e);
    }
    return 1.0f / _mm512_reduce_add_ps(sum);
}

ATT512_TARGET static void att_item512(const att_args *a, int64_t b, int64_t h, int64_t i0,
                                      int64_t i1, float *kt, float *vc, float *sc) {
    const int64_t *st = a->st;
    const int64_t kvh = h / (a->H / a->Hkv), D = a->D;
    const float *kb = a->k + b * st[3] + kvh * st[4];
    const float *qb = a->q + b * st[0] + h * st[1];
    const int64_t nk = att_kend(a, i1 - 1), ldk = att_round16(nk), lds = ldk;
    const int64_t ldv = att_round16(D);
    att_kt512(kb, st[5], nk, D, ldk, kt);
    att_copy_v(a->v + b * st[6] + kvh * st[7], st[8], nk, D, ldv, vc);
    for (int64_t i = i0; i < i1; i += ATT_RB) {
        const float *qr[ATT_RB];
        float *orow[ATT_RB];
        float inv[ATT_RB];
        int masked[ATT_RB];
        for (int r = 0; r < ATT_RB; r++) {
            const int64_t ir = i + r < i1 ? i + r : i1 - 1; /* tail: repeat the last row */
            qr[r] = qb + ir * st[2];
            orow[r] = i + r < i1 ? att_out_row(a, b, h, i + r) : NULL;
            masked[r] = 0;
        }
        const int64_t last_i = i + ATT_RB < i1 ? i + ATT_RB - 1 : i1 - 1;
        const int64_t n = att_kend(a, last_i), npad = att_round16(n);
        for (int64_t j = 0; j < npad; j += 48) { /* 8 queries x 48 keys; 4 x 64 for 64 */
            const int64_t nv = (npad - j) / 16;
            float *s = sc + j;
            const float *k = kt + j;
            if (nv >= 3) att_qk512_tile(qr, k, ldk, D, a->scale, s, lds, ATT_RB, 3);
            else if (nv == 2) att_qk512_tile(qr, k, ldk, D, a->scale, s, lds, ATT_RB, 2);
            else att_qk512_tile(qr, k, ldk, D, a->scale, s, lds, ATT_RB, 1);
        }
        const int rows = (int)(last_i - i + 1);
        for (int r = 0; r < rows; r++)
            inv[r] = att_row512(a, sc + r * lds, b, h, i + r, npad, &masked[r]);
        for (int r = rows; r < ATT_RB; r++) { /* unused rows of a tail block: p = 0 */
            inv[r] = 0.0f;
            memset(sc + r * lds, 0, (size_t)npad * sizeof(float));
        }
        for (int64_t d0 = 0; d0 < D; d0 += 32) { /* 8 queries x 32 dims: 16 accumulators */
            const int64_t dn = D - d0 < 32 ? D - d0 : 32, nv = (dn + 15) / 16;
            const int64_t tail = dn - 16 * (nv - 1);
            const __mmask16 last = (__mmask16)((1u << tail) - 1u);
            const float *v = vc + d0;
            float *o[ATT_RB];
            for (int r = 0; r < ATT_RB; r++) o[r] = orow[r] ? orow[r] + d0 : NULL;
            if (nv == 2 && tail == 16) att_pv512_tile(sc, lds, v, ldv, n, last, o, inv, ATT_RB, 2, 0);
            else if (nv == 2) att_pv512_tile(sc, lds, v, ldv, n, last, o, inv, ATT_RB, 2, 1);
            else if (tail == 16) att_pv512_tile(sc, lds, v, ldv, n, last, o, inv, ATT_RB, 1, 0);
            else att_pv512_tile(sc, lds, v, ldv, n, last, o, inv, ATT_RB, 1, 1);
        }
        for (int r = 0; r < rows; r++)
            if (masked[r]) memset(orow[r], 0, (size_t)D * sizeof(float));
    }
}

/* ---- AVX2 ---- */
#define ATT2_TARGET __attribute__((target("avx2,fma")))

/* e^x for x <= 0 or NaN; x below -87 (and -inf) gives 0 (exp(-87) < 2^-125), NaN gives NaN */
ATT2_TARGET static inline __m256 att_exp256(__m256 x) {
    const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_NLT_UQ); /* NaN: kept */
    x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(ATT_EXP_C1), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(ATT_EXP_C2), r);
    const __m256 z = _mm256_mul_ps(r, r);
    __m256 y = ATT_EXP_POLY(_mm256_fmadd_ps, _mm256_set1_ps, r, z);
    y = _mm256_fmadd_ps(y, z, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(e)), keep);
}

static const int32_t att_mask8[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

ATT2_TARGET static inline __m256i att_tailmask8(int64_t n) { /* first n (1..8) lanes */
    return _mm256_loadu_si256((const __m256i *)(att_mask8 + 8 - n));
}

ATT2_TARGET static void att_kt256(const float *kb, int64_t ks, int64_t n, int64_t D, int64_t ldk,
                                  float *kt) {
    for (int64_t j0 = 0; j0 < ldk; j0 += 8)
        for (int64_t d0 = 0; d0 < D; d0 += 8) {
            const int64_t dn = D - d0 < 8 ? D - d0 : 8;
            const __m256i dm = att_tailmask8(dn);
            __m256 r[8], t[8], u[8];
            for (int p = 0; p < 8; p++)
                r[p] = j0 + p < n ? _mm256_maskload_ps(kb + (j0 + p) * ks + d0, dm)
                                  : _mm256_setzero_ps();
            for (int p = 0; p < 4; p++) {
                t[2 * p] = _mm256_unpacklo_ps(r[2 * p], r[2 * p + 1]);
                t[2 * p + 1] = _mm256_unpackhi_ps(r[2 * p], r[2 * p + 1]);
            }
            for (int g = 0; g < 2; g++) { /* u[4g + c]: lane L = rows 4g..4g+3, column 4L + c */
                u[4 * g] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
                u[4 * g + 1] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
                u[4 * g + 2] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
                u[4 * g + 3] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
            }
            for (int c = 0; c < 4; c++) {
                r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
                r[4 + c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
            }
            for (int64_t c = 0; c < dn; c++) _mm256_storeu_ps(kt + (d0 + c) * ldk + j0, r[c]);
        }
}

ATT2_TARGET static void att_qk256_tile(const float *const *qr, const float *kt, int64_t ldk,
                                       int64_t D, float scale, float *sc, int64_t lds) {
    __m256 acc[ATT_R][2];
    for (int r = 0; r < ATT_R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d++) {
        const __m256 k0 = _mm256_loadu_ps(kt + d * ldk), k1 = _mm256_loadu_ps(kt + d * ldk + 8);
        for (int r = 0; r < ATT_R; r++) {
            const __m256 qb = _mm256_broadcast_ss(qr[r] + d);
            acc[r][0] = _mm256_fmadd_ps(qb, k0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(qb, k1, acc[r][1]);
        }
    }
    const __m256 s = _mm256_set1_ps(scale);
    for (int r = 0; r < ATT_R; r++) {
        _mm256_storeu_ps(sc + r * lds, _mm256_mul_ps(acc[r][0], s));
        _mm256_storeu_ps(sc + r * lds + 8, _mm256_mul_ps(acc[r][1], s));
    }
}

/* out rows [d0, d0 + dn) for dn <= 16 (masked loads / stores past dn) */
ATT2_TARGET static void att_pv256_tile(const float *p, int64_t lds, const float *vb, int64_t vs,
                                       int64_t n, int64_t dn, float *const *orow, const float *inv) {
    const __m256i m0 = att_tailmask8(dn < 8 ? dn : 8);
    const __m256i m1 = dn > 8 ? att_tailmask8(dn - 8) : _mm256_setzero_si256();
    __m256 acc[ATT_R][2];
    for (int r = 0; r < ATT_R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; j++) {
        const __m256 v0 = _mm256_maskload_ps(vb + j * vs, m0);
        const __m256 v1 = _mm256_maskload_ps(vb + j * vs + 8, m1);
        for (int r = 0; r < ATT_R; r++) {
            const __m256 pb = _mm256_broadcast_ss(p + r * lds + j);
            acc[r][0] = _mm256_fmadd_ps(pb, v0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(pb, v1, acc[r][1]);
        }
    }
    for (int r = 0; r < ATT_R; r++) {
        if (!orow[r]) continue;
        const __m256 s = _mm256_set1_ps(inv[r]);
        _mm256_maskstore_ps(orow[r], m0, _mm256_mul_ps(acc[r][0], s));
        _mm256_maskstore_ps(orow[r] + 8, m1, _mm256_mul_ps(acc[r][1], s));
    }
}

/* att_row512 with AVX2: a score row into softmax numerators, the limit and the mask applied
 * as the row is loaded; returns 1 / sum, or 0 and *masked = 1 when every key is masked */
ATT2_TARGET static float att_row256(const att_args *a, float *s, int64_t b, int64_t h, int64_t i,
                                    int64_t n_pad, int *masked) {
    const int64_t lim = att_kend(a, i);
    const int64_t *ms = a->st + 9;
    int kind = a->mask_kind;
    if (kind && ms[3] != 1) { /* a mask strided along the keys: scalar, then as unmasked */
        att_fix_row(a, s, b, h, i, lim);
        kind = 0;
    }
    const float *mf = kind == 1 ? (const float *)a->mask + b * ms[0] + h * ms[1] + i * ms[2] : NULL;
    const uint8_t *mb = kind == 2 ? (const uint8_t *)a->mask + b * ms[0] + h * ms[1] + i * ms[2] : NULL;
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 mx = ninf;
    for (int64_t j = 0; j < n_pad; j += 8) {
        const int64_t left = lim - j < 0 ? 0 : lim - j < 8 ? lim - j : 8;
        const __m256i in = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)left), lane);
        __m256 x = _mm256_blendv_ps(ninf, _mm256_loadu_ps(s + j), _mm256_castsi256_ps(in));
        if (mf) x = _mm256_add_ps(x, _mm256_maskload_ps(mf + j, in));
        if (mb) {
            int64_t t = 0; /* bytes past the limit stay 0: masked, as those keys are anyway */
            memcpy(&t, mb + j, (size_t)left);
            const __m256i w = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(t));
            const __m256i off = _mm256_cmpeq_epi32(w, _mm256_setzero_si256());
            x = _mm256_blendv_ps(x, ninf, _mm256_castsi256_ps(off));
        }
        _mm256_storeu_ps(s + j, x);
        mx = _mm256_max_ps(x, mx); /* NaN x: max returns mx (ignored here, kept in the sum) */
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 0x55));
    const float m = _mm_cvtss_f32(m4);
    *masked = att_all_masked(s, n_pad, m);
    if (*masked) return 0.0f;
    const __m256 mv = _mm256_set1_ps(m);
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < n_pad; j += 8) {
        const __m256 e = att_exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
        _mm256_storeu_ps(s + j, e);
        sum = _mm256_add_ps(sum, e);
    }
    return 1.0f / hsum_ps(sum);
}

ATT2_TARGET static void att_item256(const att_args *a, int64_t b, int64_t h, int64_t i0,
                                    int64_t i1, float *kt, float *vc, float *sc) {
    const int64_t *st = a->st;
    const int64_t kvh = h / (a->H / a->Hkv), D = a->D;
    const float *kb = a->k + b * st[3] + kvh * st[4];
    const float *vb0 = a->v + b * st[6] + kvh * st[7];
    const float *qb = a->q + b * st[0] + h * st[1];
    const int64_t nk = att_kend(a, i1 - 1), ldk = att_round16(nk), lds = ldk;
    const int64_t ldv = att_round16(D);
    const float *vb = vc;
    att_kt256(kb, st[5], nk, D, ldk, kt);
    att_copy_v(vb0, st[8], nk, D, ldv, vc);
    for (int64_t i = i0; i < i1; i += ATT_R) {
        const float *qr[ATT_R];
        float *orow[ATT_R];
        float inv[ATT_R];
        int masked[ATT_R];
        for (int r = 0; r < ATT_R; r++) {
            const int64_t ir = i + r < i1 ? i + r : i1 - 1;
            qr[r] = qb + ir * st[2];
            orow[r] = i + r < i1 ? att_out_row(a, b, h, i + r) : NULL;
        }
        const int64_t last_i = i + ATT_R < i1 ? i + ATT_R - 1 : i1 - 1;
        const int64_t n = att_kend(a, last_i), npad = att_round16(n);
        for (int64_t j = 0; j < npad; j += 16) att_qk256_tile(qr, kt + j, ldk, D, a->scale, sc + j, lds);
        for (int r = 0; r < ATT_R; r++) {
            if (!orow[r]) {
                inv[r] = 0.0f;
                for (int64_t j = 0; j < npad; j++) sc[r * lds + j] = 0.0f;
                continue;
            }
            inv[r] = att_row256(a, sc + r * lds, b, h, i + r, npad, &masked[r]);
        }
        for (int64_t d0 = 0; d0 < D; d0 += 16) {
            float *o[ATT_R];
            for (int r = 0; r < ATT_R; r++) o[r] = orow[r] ? orow[r] + d0 : NULL;
            att_pv256_tile(sc, lds, vb + d0, ldv, n, D - d0 < 16 ? D - d0 : 16, o, inv);
        }
        for (int r = 0; r < ATT_R; r++)
            if (orow[r] && masked[r]) memset(orow[r], 0, (size_t)D * sizeof(float));
    }
}
#endif /* __x86_64__ */

/* level as in pick(): 0 = the best the CPU has, 1 = portable C, 2 = at most AVX2.
 * strides (elements): q b,h,s; k b,h,s; v b,h,s; mask b,h,q,k. Returns 0; -1 when an allocation
 * failed (out unspecified: the caller raises MemoryError); -2 for arguments it cannot take. */
int64_t qd_attention(const float *q, const float *k, const float *v, const void *mask,
                     int mask_kind, float *out, int64_t B, int64_t H, int64_t Hkv, int64_t Sq,
                     int64_t Sk, int64_t D, const int64_t *strides, int causal, float scale,
                     int level) {
    if (B < 0 || H < 0 || Hkv <= 0 || Sq < 0 || Sk < 0 || D < 0 || H % Hkv != 0 ||
        mask_kind < 0 || mask_kind > 2 || (mask_kind && !mask))
        return -2;
    if (B == 0 || H == 0 || Sq == 0 || D == 0) return 0;
    const att_args a = {q, k, v, mask_kind ? mask : NULL, out, B, H, Hkv, Sq, Sk, D,
                        strides, mask_kind, causal, scale};
    int path = 0; /* 0 C, 1 AVX2, 2 AVX-512 */
#ifdef __x86_64__
    if (level == 0 && has_avx512() && __builtin_cpu_supports("avx512vl")) path = 2;
    else if (level != 1 && has_avx2() && __builtin_cpu_supports("fma")) path = 1;
#else
    (void)level;
#endif
    const int par = (double)B * H * Sq * Sk * D >= ATT_PARALLEL_MIN;
    int nt = 1;
#ifdef _OPENMP
    if (par) nt = omp_get_max_threads();
#endif
    const int64_t heads = B * H;
    int64_t chunks = nt > 1 && heads < 8 * (int64_t)nt ? (8 * (int64_t)nt + heads - 1) / heads : 1;
    const int64_t max_chunks = (Sq + ATT_RB - 1) / ATT_RB;
    if (chunks > max_chunks) chunks = max_chunks;
    int64_t csize = (Sq + chunks - 1) / chunks;
    csize = (csize + ATT_RB - 1) / ATT_RB * ATT_RB;
    chunks = (Sq + csize - 1) / csize;
    const int64_t items = heads * chunks, ldk = att_round16(Sk);
    /* per thread: kt [D][ldk] and vc [Sk][D rounded to 16] (vector paths), the score rows
     * [ATT_R][ldk] (C: one row) */
    const size_t vec = path ? (size_t)(D * ldk + Sk * att_round16(D)) : 0;
    const size_t n_floats = vec + (size_t)ATT_RB * (size_t)ldk + 16;
    int failed = 0;
#pragma omp parallel if (par) reduction(| : failed)
    {
        char *mem = (char *)malloc(n_floats * sizeof(float) + 64);
        float *kt = mem ? (float *)(mem + (64 - (uintptr_t)mem % 64) % 64) : NULL;
        float *vc = kt ? kt + (path ? D * ldk : 0) : NULL;
        float *sc = kt ? kt + vec : NULL;
        if (!mem) failed = 1;
#pragma omp for schedule(static)
        for (int64_t it = 0; it < items; it++) {
            if (!mem) continue;
            const int64_t bh = it / chunks, c = it % chunks;
            const int64_t b = bh / H, h = bh % H, i0 = c * csize;
            const int64_t i1 = i0 + csize < Sq ? i0 + csize : Sq;
#ifdef __x86_64__
            if (path == 2) {
                att_item512(&a, b, h, i0, i1, kt, vc, sc);
                continue;
            }
            if (path == 1) {
                att_item256(&a, b, h, i0, i1, kt, vc, sc);
                continue;
            }
#endif
            att_item_c(&a, b, h, i0, i1, sc);
        }
        free(mem);
    }
    return failed ? -1 : 0;
}

/* ---------------------------------------------------------------------------------------------
 * Exact (erf) GELU of a transformer's feed-forward block (#15, "transformers that actually run
 * faster"): the same function as torch's in one call, vectorized, threaded from 16 K elements.
 * Called alone and warm it is slower than torch's (0.83x for 40 x 1536, 0.73x for 32 x 40 x
 * 1536, benchmarks/gelu_ab.py: the division of A&S's t costs); between a packed MiniLM's other
 * calls it takes 0.3-0.6 ms off a ~5-8 ms 40-token forward (benchmarks/fastpaths_ab.py), and is
 * neutral at batch 32. Not bit-identical with torch (erf
 * by a polynomial, |error| <= 1.5e-7; torch's own vectorized GELU is ~1e-6 from float64):
 * tests/test_kernel_gelu.py compares both with float64.
 *
 * The body is plain branch-free C that the compiler vectorizes, inlined into an AVX-512, an
 * AVX2 and a portable clone (level as in pick(): 0 best, 1 portable, 2 AVX2). Called through
 * the plan protocol of qd_a8_run (run(fn, plan, x, y, rows, level)).
 *
 * (A C LayerNorm, alone and fused with BERT's residual add, was built and measured in the same
 * session: no faster than torch's within the noise at 40 x 384 (three passes of real work, and
 * the Python around it costs what torch's dispatch does); removed.)
 */
typedef struct {
    int64_t D; /* elements of one row */
} qd_gelu_plan;

/* For this section: no-trapping-math lets the compiler turn the clamps and selects into vector
 * blends (it otherwise keeps branches in case a comparison raises a floating-point exception
 * nobody reads; torch builds all of ATen so); fp-contract=fast lets it use fused multiply-adds
 * (the file's -ffp-contract=off keeps the other kernels' levels bit-identical; GELU is compared
 * with torch within ulps, not bit for bit). */
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math", "fp-contract=fast")

#define GELU_PARALLEL_MIN (1 << 14) /* elements: below it one thread */
#define QD_INLINE static inline __attribute__((always_inline))

/* e^a for a <= 0 (below -87, and NaN, taken as -87: e^-87 < 2^-125; the caller handles both),
 * relative error < 1e-7: a = n ln 2 + r with |r| <= ln 2 / 2, a degree-7 Taylor polynomial for
 * e^r, 2^n written into the exponent bits (n >= -126: always a normal float, and never the
 * undefined integer conversion of a NaN). */
QD_INLINE float exp_nonpos(float a) {
    a = a > -87.0f ? a : -87.0f;
    const float n = floorf(a * 1.44269504f + 0.5f);
    const float r = (a - n * 0.693145752f) - n * 1.42860677e-6f; /* ln 2, split hi + lo */
    float q = 1.0f / 5040.0f;
    q = q * r + 1.0f / 720.0f;
    q = q * r + 1.0f / 120.0f;
    q = q * r + 1.0f / 24.0f;
    q = q * r + 1.0f / 6.0f;
    q = q * r + 0.5f;
    q = q * r + 1.0f;
    q = q * r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return q * two_n;
}

/* GELU(x) = x Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2 (Hendrycks & Gimpel 2016; BERT's
 * "gelu"). The upper tail 1 - Phi(|x|) = erfc(z) / 2, z = |x| / sqrt 2, by Abramowitz & Stegun
 * 7.1.26 (|error of erf| <= 1.5e-7): erfc(z) ~ t (a1 + t (a2 + ... a5)) e^(-z^2), t = 1 / (1 +
 * 0.3275911 z). For x < 0 Phi is the tail itself (no cancellation), for x >= 0 one minus it. */
QD_INLINE float gelu1(float x) {
    const float z = fabsf(x) * 0.70710678f;
    const float t = 1.0f / (1.0f + 0.3275911f * z);
    float poly = 1.061405429f;
    poly = poly * t - 1.453152027f;
    poly = poly * t + 1.421413741f;
    poly = poly * t - 0.284496736f;
    poly = poly * t + 0.254829592f;
    /* beyond z^2 = 80 the tail is < 1e-36: taken as 0, which keeps every product normal (a
     * subnormal float costs ~100 cycles an operation) */
    const float z2 = z * z;
    const float tail = z2 > 80.0f ? 0.0f : 0.5f * poly * t * exp_nonpos(-z2);
    const float phi = x >= 0.0f ? 1.0f - tail : tail;
    return x * phi; /* NaN stays NaN; -inf: -inf * 0 = NaN, as torch */
}

QD_INLINE void gelu_span(const float *x, float *y, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) y[i] = gelu1(x[i]);
}

/* A span of n elements per call, in three compiled clones. */
typedef void (*gelu_span_fn)(const float *x, float *y, int64_t n);

#define GELU_CLONES(suffix, target_attr)                                                            \
    target_attr static void gelu_span_##suffix(const float *x, float *y, int64_t n) {              \
        gelu_span(x, y, n);                                                                        \
    }

GELU_CLONES(c, )
#ifdef __x86_64__
GELU_CLONES(avx2, __attribute__((target("avx2,fma"))))
GELU_CLONES(avx512, __attribute__((target("avx512f,avx512bw,avx512vl,fma"))))
#endif

#pragma GCC pop_options

/* The clone for level (as pick(): 0 the best the CPU has, 1 portable C, 2 at most AVX2). */
static int gelu_path(int level) {
#ifdef __x86_64__
    if (level == 0 && has_avx512()) return 2;
    if (level != 1 && has_avx2()) return 1;
#endif
    (void)level;
    return 0;
}

int64_t qd_gelu_run(const qd_gelu_plan *p, const float *x, float *y, int64_t rows, int level) {
    if (!p || p->D <= 0 || rows < 0) return -2;
    gelu_span_fn fn = gelu_span_c;
#ifdef __x86_64__
    int path = gelu_path(level);
    fn = path == 2 ? gelu_span_avx512 : path == 1 ? gelu_span_avx2 : gelu_span_c;
#else
    (void)level;
#endif
    const int64_t n = rows * p->D, chunk = 4096;
#pragma omp parallel for schedule(static) if (n >= GELU_PARALLEL_MIN)
    for (int64_t c = 0; c < n; c += chunk) fn(x + c, y + c, n - c < chunk ? n - c : chunk);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * The C ABI, declared once (issue #15 item 5). QD_API lists every entry point Python calls as
 * X(return type, name, (parameters)). Expanded with QD_DECLARE it gives their prototypes, which
 * the compiler checks against the definitions above (a drifted one is a "conflicting types"
 * error); expanded with QD_SIGNATURE it gives the string qd_signatures() returns, which
 * qdistill/pack/cabi.py parses into ctypes argtypes / restype when the library loads. Changing
 * or adding an entry point is one line here (and a qd_abi_version bump); Python declares none.
 * ------------------------------------------------------------------------------------------- */
#define QD_API(X)                                                                                  \
    X(int, qd_abi_version, (void))                                                                 \
    X(int, qd_has_avx2, (void))                                                                    \
    X(int, qd_has_vnni, (void))                                                                    \
    X(int, qd_has_amx, (void))                                                                     \
    X(int64_t, qd_advise_hugepages, (void *p, int64_t n))                                          \
    X(int64_t, qd_quantize_rows, (const float *x, int8_t *xq, float *scale, int32_t *rowsum,       \
          int64_t rows, int64_t I, int64_t I_pad, float eps, int level))                           \
    X(void, qd_ternary_gemm, (const uint8_t *w, const int8_t *x, const int32_t *rowsum,            \
          const int32_t *zp, const float *x_scale, const float *w_scale, const float *bias,        \
          float *y, int64_t B, int64_t O, int64_t I_pad, int level))                               \
    X(void, qd_int8_gemm, (const int8_t *w, const int8_t *x, const int32_t *wsum,                  \
          const float *x_scale, const float *w_scale, const float *bias, float *y, int64_t B,      \
          int64_t O, int64_t I, int level))                                                        \
    X(int, qd_int4_gemm, (const uint8_t *w, const float *s, const uint8_t *zp, const int8_t *x,    \
          const float *x_scale, const float *bias, float *y, int64_t B, int64_t O, int64_t I,      \
          int64_t g, int level))                                                                   \
    X(int64_t, qd_amx_int8_bytes, (int64_t O, int64_t I))                                          \
    X(void, qd_amx_pack_int8, (const int8_t *w, int64_t O, int64_t I, int8_t *out))                \
    X(int, qd_lut_gemm, (const uint8_t *w, const float *s, const uint8_t *zp, int zp_const,        \
          int bits, const float *x, const float *bias, float *y, int64_t B, int64_t O, int64_t I,  \
          int64_t g, int level))                                                                   \
    X(void, qd_int8w_gemm, (const int8_t *w, const float *w_scale, const float *x,                 \
          const float *bias, float *y, int64_t B, int64_t O, int64_t I, int level))                \
    X(void, qd_dequant_rows, (const uint8_t *codes, int64_t n_bytes, int bits, int mul,            \
          const float *scale, const uint8_t *zp_arr, int zp_const, int div, const float *zf,       \
          int64_t o0, int64_t o1, int64_t K, int64_t G, float *out))                               \
    X(void, qd_dequant_gather, (const uint8_t *codes, int64_t n_bytes, int bits, int mul,          \
          const float *scale, const uint8_t *zp_arr, int zp_const, int div, const float *zf,       \
          const int64_t *idx, int64_t n_idx, int64_t K, int64_t G, float *out))                    \
    X(int64_t, qd_a8_linear, (int kind, const void *w, const float *w_scale, const void *zp,       \
          const int32_t *wsum, const float *bias, int64_t O, int64_t I, int64_t I_pad, int64_t g,  \
          float eps, const float *x, float *y, int64_t B, int level))                              \
    X(int64_t, qd_a8_run, (const qd_a8_plan *p, const float *x, float *y, int64_t B, int level)) \
    X(int64_t, qd_wo_run, (const qd_wo_plan *p, const float *x, float *y, int64_t B, int level)) \
    X(int64_t, qd_chain_run, (const qd_chain *c, const float *x, float *y, int64_t B, int level)) \
    X(int64_t, qd_attention, (const float *q, const float *k, const float *v, const void *mask,    \
          int mask_kind, float *out, int64_t B, int64_t H, int64_t Hkv, int64_t Sq, int64_t Sk,    \
          int64_t D, const int64_t *strides, int causal, float scale, int level)) \
    X(int64_t, qd_gelu_run, (const qd_gelu_plan *p, const float *x, float *y, int64_t rows, int level))

#define QD_DECLARE(ret, name, params) ret name params;
QD_API(QD_DECLARE)
#undef QD_DECLARE

#define QD_SIGNATURE(ret, name, params) #ret " " #name #params ";"
const char *qd_signatures(void) { return QD_API(QD_SIGNATURE); }
#undef QD_SIGNATURE
