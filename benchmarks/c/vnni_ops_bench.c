/* What qgemm_vnni.c's inner loop costs on this CPU (AVX-512 VNNI and BF16), and what the alternatives would:
 * one register block of 6 rows x 32 columns over K = 576 (18 blocks of 32), weights and activations from L1,
 * one thread. Each line: multiply-adds per second, and nanoseconds per block pass.
 *
 *     make bench-c, or: gcc -O3 -march=native benchmarks/c/vnni_ops_bench.c -o /tmp/vnni_ops_bench && /tmp/vnni_ops_bench
 *
 * - offset (qgemm_vnni.c): weights stored +128 as u8, activations signed; vpdpbusd straight from the
 *   broadcast activations, each block's sum started at -128 * sum(x) (cx), then vcvtdq2ps + vfmadd.
 * - sign, zmm: llama.cpp's trick as AVX-512 must write it (no vpsignb for zmm): |x| unsigned, the sign of x
 *   moved onto the weights by a masked negate per row and instruction (vpmovb2m + vpabsb per row and k-step).
 * - sign, ymm vpsignb: the same with AVX2's vpsignb and vpdpbusd on 256-bit registers (AVX512-VL): twice the
 *   instructions of half the width.
 * - bf16 vdpbf16ps: gemm.c's loop over the same shape for reference (two k per lane, not four).
 * Compile and run on a CPU without AVX-512 VNNI and BF16 and it says so and exits 2. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__AVX512VNNI__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>

#define ROWS 6
#define K 576
#define NB (K / 32)

static uint8_t W[K * 32];             /* [K / 4][32][4] */
static int8_t X[ROWS * K];
static float SX[ROWS * NB];
static int32_t CX[ROWS * NB];
static uint16_t WB[K * 32], XB[ROWS * K]; /* bf16, [K / 2][32][2] and rows */
static volatile float sink;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void finish(__m512 acc[ROWS][2]) {
    float s = 0.0f;
    for (int m = 0; m < ROWS; m++) s += _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
    sink = s;
}

/* The zmm loop, with the unsigned offset (sign = 0: each block's sum starts at cx, the bare vpdpbusd) or the
 * sign trick (sign = 1: |x| unsigned, the weights negated under x's sign mask per row and instruction). */
static inline __attribute__((always_inline)) void zmm_loop(int reps, const int sign) {
    for (int r = 0; r < reps; r++) {
        __m512 acc[ROWS][2];
        for (int m = 0; m < ROWS; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
        for (int b = 0; b < NB; b++) {
            __m512i s[ROWS][2];
            for (int m = 0; m < ROWS; m++) s[m][0] = s[m][1] = _mm512_set1_epi32(sign ? 0 : CX[m * NB + b]);
            for (int p = 0; p < 8; p++) {
                const __m512i w0 = _mm512_loadu_si512(W + (b * 8 + p) * 128), w1 = _mm512_loadu_si512(W + (b * 8 + p) * 128 + 64);
                for (int m = 0; m < ROWS; m++) {
                    int32_t q;
                    memcpy(&q, X + m * K + b * 32 + 4 * p, 4);
                    const __m512i xb = _mm512_set1_epi32(q);
                    if (sign) {
                        const __mmask64 neg = _mm512_movepi8_mask(xb);
                        const __m512i ax = _mm512_abs_epi8(xb);
                        s[m][0] = _mm512_dpbusd_epi32(s[m][0], ax, _mm512_mask_sub_epi8(w0, neg, _mm512_setzero_si512(), w0));
                        s[m][1] = _mm512_dpbusd_epi32(s[m][1], ax, _mm512_mask_sub_epi8(w1, neg, _mm512_setzero_si512(), w1));
                    } else {
                        s[m][0] = _mm512_dpbusd_epi32(s[m][0], w0, xb);
                        s[m][1] = _mm512_dpbusd_epi32(s[m][1], w1, xb);
                    }
                }
            }
            for (int m = 0; m < ROWS; m++) {
                const __m512 sc = _mm512_set1_ps(SX[m * NB + b]);
                acc[m][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[m][0]), sc, acc[m][0]);
                acc[m][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[m][1]), sc, acc[m][1]);
            }
        }
        finish(acc);
    }
}

static void offset(int reps) { zmm_loop(reps, 0); }
static void sign_zmm(int reps) { zmm_loop(reps, 1); }

static void sign_ymm(int reps) {
    for (int r = 0; r < reps; r++) {
        __m256 acc[ROWS][4];
        for (int m = 0; m < ROWS; m++)
            for (int j = 0; j < 4; j++) acc[m][j] = _mm256_setzero_ps();
        for (int b = 0; b < NB; b++) {
            __m256i s[ROWS][4];
            for (int m = 0; m < ROWS; m++)
                for (int j = 0; j < 4; j++) s[m][j] = _mm256_setzero_si256();
            for (int p = 0; p < 8; p++) {
                __m256i w[4];
                for (int j = 0; j < 4; j++) w[j] = _mm256_loadu_si256((const __m256i *)(W + (b * 8 + p) * 128 + 32 * j));
                for (int m = 0; m < ROWS; m++) {
                    int32_t q;
                    memcpy(&q, X + m * K + b * 32 + 4 * p, 4);
                    const __m256i xb = _mm256_set1_epi32(q), ax = _mm256_sign_epi8(xb, xb);
                    for (int j = 0; j < 4; j++) s[m][j] = _mm256_dpbusd_epi32(s[m][j], ax, _mm256_sign_epi8(w[j], xb));
                }
            }
            for (int m = 0; m < ROWS; m++) {
                const __m256 sc = _mm256_set1_ps(SX[m * NB + b]);
                for (int j = 0; j < 4; j++) acc[m][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[m][j]), sc, acc[m][j]);
            }
        }
        float t = 0.0f, v[8];
        for (int m = 0; m < ROWS; m++)
            for (int j = 0; j < 4; j++) {
                _mm256_storeu_ps(v, acc[m][j]);
                t += v[0] + v[7];
            }
        sink = t;
    }
}

static void bf16(int reps) {
    for (int r = 0; r < reps; r++) {
        __m512 acc[ROWS][2];
        for (int m = 0; m < ROWS; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
        for (int p = 0; p < K / 2; p++) {
            const __m512bh w0 = (__m512bh)_mm512_loadu_si512(WB + p * 64), w1 = (__m512bh)_mm512_loadu_si512(WB + p * 64 + 32);
            for (int m = 0; m < ROWS; m++) {
                int32_t pair;
                memcpy(&pair, XB + m * K + 2 * p, 4);
                const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
                acc[m][0] = _mm512_dpbf16_ps(acc[m][0], a, w0);
                acc[m][1] = _mm512_dpbf16_ps(acc[m][1], a, w1);
            }
        }
        finish(acc);
    }
}

int main(void) {
    for (size_t i = 0; i < sizeof W; i++) W[i] = (uint8_t)(rand() % 255 + 1);
    for (size_t i = 0; i < sizeof X; i++) X[i] = (int8_t)(rand() % 255 - 127);
    for (size_t i = 0; i < sizeof WB / 2; i++) WB[i] = 0x3c00 + (uint16_t)(rand() % 256), XB[i % (ROWS * K)] = 0x3c00;
    for (int i = 0; i < ROWS * NB; i++) SX[i] = 0.01f, CX[i] = -128 * (i % 7);
    const struct { const char *name; void (*run)(int); } variants[] = {
        {"offset (qgemm_vnni.c)", offset}, {"sign, zmm masked negate", sign_zmm}, {"sign, ymm vpsignb", sign_ymm},
        {"bf16 vdpbf16ps (gemm.c)", bf16},
    };
    const int reps = 100000;
    for (int round = 0; round < 2; round++)
        for (size_t v = 0; v < sizeof variants / sizeof variants[0]; v++) {
            variants[v].run(1000);
            double t = now();
            variants[v].run(reps);
            t = now() - t;
            const double macs = (double)reps * ROWS * 32 * K;
            printf("%-26s %6.1f G multiply-adds/s (one thread), %.1f ns per 6 x 32 x %d block\n", variants[v].name,
                   macs / t / 1e9, t / reps * 1e9, K);
        }
    return 0;
}

#else
int main(void) {
    puts("this CPU (or these -march flags) has no AVX-512 VNNI and BF16: nothing to measure");
    return 2;
}
#endif
