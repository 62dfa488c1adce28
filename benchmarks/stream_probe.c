/*
 * Streaming probes behind benchmarks/results/kernels-gemv.md (#15 item 1): how fast can one or
 * two threads of this CPU read int8 weights that are not in the caches, and what in the way a
 * batch-1 GEMV reads them (streams a pass, software prefetch distance, the split of rows over
 * threads, OpenMP wake-up, the state the caches were left in) moves that rate. Not part of the
 * package; build and run by hand:
 *
 *   gcc -O3 -fopenmp -march=native -o /tmp/stream_probe benchmarks/stream_probe.c
 *   /tmp/stream_probe stream THREADS STREAMS PF LAYER_MB COLD_MB FLUSH REPS
 *       one "layer" of LAYER_MB read as rows of 4096 bytes, blocks of STREAMS rows read side by
 *       side (each 64-byte step: one line of each row, summed with vpdpbusd as the W8A8 GEMV
 *       does), blocks split over THREADS with a static schedule, prefetch PF lines ahead
 *       (0: none); every call reads the next of the copies filling COLD_MB (cold: more than the
 *       L3); FLUSH 0: nothing between calls, 1: read a 400 MB buffer, 2: write it (the caches
 *       then hold dirty lines that must be written back as the weights come in), 3: sleep 20 ms,
 *       4: the calling thread spins 20 ms while the pool's worker sleeps. Prints the
 *       median and best GB/s and each thread's median busy time.
 *       Buffers are advised for transparent huge pages unless PROBE_4K is set; PROBE_DYNAMIC=N
 *       splits the blocks over the threads in dynamic chunks of N blocks (default: static).
 *   /tmp/stream_probe wake THREADS SLEEP_US REPS
 *       the cost of an empty parallel region entered SLEEP_US after the previous one.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define ROW 4096

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void *alloc(size_t n) {
    void *p = aligned_alloc(1 << 21, (n + (1 << 21) - 1) & ~(size_t)((1 << 21) - 1));
    if (!getenv("PROBE_4K")) madvise(p, n, MADV_HUGEPAGE); /* PROBE_4K=1: 4 KB pages */
    memset(p, 1, n);
    return p;
}

/* R rows side by side, prefetch PF lines ahead; returns a sum so nothing is optimized away */
static __m512i block(const int8_t *w, int R, int pf, __m512i acc) {
    const __m512i ones = _mm512_set1_epi8(1);
    for (int64_t i = 0; i < ROW; i += 64)
        for (int r = 0; r < R; r++) {
            const int8_t *p = w + (int64_t)r * ROW + i;
            if (pf) _mm_prefetch((const char *)(p + 64 * pf), _MM_HINT_T0);
            __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(ones), "m"(*(const __m512i *)p));
        }
    return acc;
}

static int stream(int argc, char **argv) {
    if (argc < 9) return 2;
    int T = atoi(argv[2]), R = atoi(argv[3]), pf = atoi(argv[4]);
    size_t layer = (size_t)(atof(argv[5]) * 1e6) / (ROW * 64) * (ROW * 64);
    size_t cold = (size_t)(atof(argv[6]) * 1e6);
    int flush = atoi(argv[7]), reps = atoi(argv[8]);
    int copies = cold > layer ? (int)(cold / layer) : 1;
    int8_t *buf = alloc(layer * copies);
    size_t fl_n = 400u << 20;
    int8_t *fl = flush ? alloc(fl_n) : NULL;
    int64_t rows = layer / ROW, blocks = rows / R;
    double *t = calloc(reps, sizeof(double)), *busy = calloc((size_t)reps * T, sizeof(double));
    long long sink = 0;
    omp_set_num_threads(T);
    int chunk = getenv("PROBE_DYNAMIC") ? atoi(getenv("PROBE_DYNAMIC")) : 0;
    omp_set_schedule(chunk ? omp_sched_dynamic : omp_sched_static, chunk);
    for (int k = -3; k < reps; k++) {
        if (flush == 1) {
            __m512i a = _mm512_setzero_si512();
            for (size_t i = 0; i < fl_n; i += 64)
                a = _mm512_add_epi8(a, _mm512_load_si512((const void *)(fl + i)));
            sink += _mm512_reduce_add_epi32(a);
        } else if (flush == 3) { /* both threads idle 20 ms (the worker sleeps, cores halt) */
            usleep(20000);
        } else if (flush == 4) { /* the calling thread busy 20 ms, the worker asleep */
            double t_end = now() + 0.02;
            while (now() < t_end) sink++;
        } else if (flush == 2) {
            __m512i v = _mm512_set1_epi8((char)k); /* ordinary stores (memset may bypass the cache) */
            for (size_t i = 0; i < fl_n; i += 64) _mm512_store_si512((void *)(fl + i), v);
        }
        const int8_t *w = buf + (size_t)((k + 3) % copies) * layer;
        double t0 = now();
#pragma omp parallel reduction(+ : sink)
        {
            double b0 = now();
            __m512i acc = _mm512_setzero_si512();
#pragma omp for schedule(runtime) nowait
            for (int64_t u = 0; u < blocks; u++) acc = block(w + u * R * ROW, R, pf, acc);
            sink += _mm512_reduce_add_epi32(acc);
            if (k >= 0) busy[(size_t)k * T + omp_get_thread_num()] = now() - b0;
        }
        if (k >= 0) t[k] = now() - t0;
    }
    double *bt = calloc(reps, sizeof(double));
    qsort(t, reps, sizeof(double), cmp);
    printf("threads %d streams %2d pf %2d layer %.1f MB copies %d flush %d: median %.1f GB/s "
           "(%.0f us), best %.1f GB/s; busy median",
           T, R, pf, layer / 1e6, copies, flush, layer / t[reps / 2] / 1e9, t[reps / 2] * 1e6,
           layer / t[0] / 1e9);
    for (int th = 0; th < T; th++) {
        for (int k = 0; k < reps; k++) bt[k] = busy[(size_t)k * T + th];
        qsort(bt, reps, sizeof(double), cmp);
        printf(" %.0f", bt[reps / 2] * 1e6);
    }
    printf(" us  (sink %lld)\n", sink & 1);
    return 0;
}

static int wake(int argc, char **argv) {
    if (argc < 5) return 2;
    int T = atoi(argv[2]), sleep_us = atoi(argv[3]), reps = atoi(argv[4]);
    double *t = calloc(reps, sizeof(double));
    omp_set_num_threads(T);
    volatile int x = 0;
    for (int k = -3; k < reps; k++) {
        if (sleep_us) usleep(sleep_us);
        double t0 = now();
#pragma omp parallel
        { x += omp_get_thread_num() == 1; }
        if (k >= 0) t[k] = now() - t0;
    }
    qsort(t, reps, sizeof(double), cmp);
    printf("threads %d after %6d us idle: parallel region median %.1f us, best %.1f us\n", T,
           sleep_us, t[reps / 2] * 1e6, t[0] * 1e6);
    return 0;
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "stream")) return stream(argc, argv);
    if (argc > 1 && !strcmp(argv[1], "wake")) return wake(argc, argv);
    fprintf(stderr, "usage: see the comment at the top of stream_probe.c\n");
    return 2;
}
