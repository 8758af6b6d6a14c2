/* What the int8 inner loop's instructions cost on this CPU (AVX2): qgemm.c's 2 rows x 4 columns over 48
 * blocks of 32 values, from L1, one thread, with parts of the loop left out. Each line: nanoseconds per
 * (row, column, block), i.e. per 32 multiply-adds, and the multiply-adds per second that rate gives.
 *
 *     make bench-c, or: gcc -O3 -march=native benchmarks/c/int8_ops_bench.c -o /tmp/int8_ops_bench && /tmp/int8_ops_bench
 *
 * full: vpsignb + vpmaddubsw + vpmaddwd + vcvtdq2ps + vfmadd, as qgemm.c; the others drop the sign, the
 * float scaling, or keep the multiplies alone. On the 2-core Zen 3 VM (2.45 GHz as it reports) the full loop
 * took 0.87-0.90 ns, about 2.1 cycles per 32 multiply-adds, where float32 takes 2 (four 8-wide FMAs, two a
 * cycle): without VNNI int8 buys bytes, not arithmetic. AVX-512 VNNI's vpdpbusd does the sign-free u8 x s8
 * multiply, the pair sums and the int32 accumulation in one instruction. */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define NB 48
#define COLS 4

static int8_t W[NB * 32 * COLS], X[2 * NB * 32];
static float SX[2 * NB];
static volatile float sink;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* One variant: BODY updates acc[m][j] (float) or iacc[m][j] (int) from ax[m], xs[m], wj, sc[m]. */
#define VARIANT(NAME, BODY)                                                                                   \
    static void NAME(int reps) {                                                                              \
        const __m256i ones = _mm256_set1_epi16(1);                                                            \
        for (int r = 0; r < reps; r++) {                                                                      \
            __m256 acc[2][COLS];                                                                              \
            __m256i iacc[2][COLS];                                                                            \
            for (int m = 0; m < 2; m++)                                                                       \
                for (int j = 0; j < COLS; j++) acc[m][j] = _mm256_setzero_ps(), iacc[m][j] = _mm256_setzero_si256(); \
            for (int b = 0; b < NB; b++) {                                                                    \
                __m256i xs[2], ax[2];                                                                         \
                __m256 sc[2];                                                                                 \
                for (int m = 0; m < 2; m++) {                                                                 \
                    xs[m] = _mm256_loadu_si256((const __m256i *)(X + m * NB * 32 + b * 32));                  \
                    ax[m] = _mm256_sign_epi8(xs[m], xs[m]);                                                   \
                    sc[m] = _mm256_set1_ps(SX[m * NB + b]);                                                   \
                }                                                                                             \
                for (int j = 0; j < COLS; j++) {                                                              \
                    const __m256i wj = _mm256_loadu_si256((const __m256i *)(W + (b * COLS + j) * 32));        \
                    for (int m = 0; m < 2; m++) { BODY }                                                      \
                }                                                                                             \
                (void)ones, (void)sc, (void)ax; /* not every variant uses all three */                        \
            }                                                                                                 \
            float s = 0.0f, t[8];                                                                             \
            for (int m = 0; m < 2; m++)                                                                       \
                for (int j = 0; j < COLS; j++) {                                                              \
                    _mm256_storeu_ps(t, _mm256_add_ps(acc[m][j], _mm256_cvtepi32_ps(iacc[m][j])));            \
                    s += t[0] + t[7];                                                                         \
                }                                                                                             \
            sink = s;                                                                                         \
        }                                                                                                     \
    }

VARIANT(full, {
    const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(ax[m], _mm256_sign_epi8(wj, xs[m])), ones);
    acc[m][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), sc[m], acc[m][j]);
})
VARIANT(no_sign, {
    const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(ax[m], wj), ones);
    acc[m][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), sc[m], acc[m][j]);
})
VARIANT(no_float_scaling, {
    const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(ax[m], _mm256_sign_epi8(wj, xs[m])), ones);
    iacc[m][j] = _mm256_add_epi32(p, iacc[m][j]);
})
VARIANT(multiplies_only, { iacc[m][j] = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(ax[m], wj), ones), iacc[m][j]); })
VARIANT(maddubs_only, { iacc[m][j] = _mm256_add_epi16(_mm256_maddubs_epi16(ax[m], wj), iacc[m][j]); })

int main(void) {
    for (size_t i = 0; i < sizeof W; i++) W[i] = (int8_t)(rand() % 255 - 127);
    for (size_t i = 0; i < sizeof X; i++) X[i] = (int8_t)(rand() % 255 - 127);
    for (int i = 0; i < 2 * NB; i++) SX[i] = 0.01f;
    const struct { const char *name; void (*run)(int); } variants[] = {
        {"full (qgemm.c)", full}, {"no vpsignb", no_sign}, {"no float scaling", no_float_scaling},
        {"vpmaddubsw + vpmaddwd", multiplies_only}, {"vpmaddubsw alone", maddubs_only},
    };
    const int reps = 200000;
    for (int round = 0; round < 2; round++)
        for (size_t v = 0; v < sizeof variants / sizeof variants[0]; v++) {
            variants[v].run(1000);
            double t = now();
            variants[v].run(reps);
            t = now() - t;
            const double items = (double)reps * NB * COLS * 2;
            const double macs = items * 32;
            printf("%-30s %.3f ns per 32 values  %6.1f G multiply-adds/s (one thread)\n", variants[v].name,
                   t / items * 1e9, macs / t / 1e9);
        }
    return 0;
}
