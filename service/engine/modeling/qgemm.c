/* int8 matrix multiply for `--quantization int8` (float32 activations on CPU):
 *
 *   qgemm_int8  y[M, N] = (q(x)[M, K] . W_q[N, K]^T) * sx[m] * sw[n], float32 out
 *
 * W_q holds symmetric int8 weights, one float scale per output channel (|W[n, :]|max / 127), quantized
 * once at load (native_kernels.quantize_weight). Each call quantizes the activation rows itself, fused
 * in one pass per row (absmax, then round to nearest even of x * 127 / absmax): sx[m] = absmax / 127.
 * The products are summed exactly in int32 (|x|, |w| <= 127, so K up to 2^31 / 127^2 ~ 133k), and
 * converted to float once, times sx[m] * sw[n]. No bias: the caller adds it.
 *
 * Why: a decode step at batch 1 reads every weight once; int8 weights are a quarter of float32's
 * bytes (half of bf16's), and the memory is what sets that step's pace.
 *
 * Packed weight layout (native_kernels.quantize_weight): groups of 4 output columns, each group
 * [Kp / 32][4][32] int8, Kp = K rounded up to 32 and N rounded up to 4 with zeros (zero weights, zero
 * scale). One k-step of a group is 128 contiguous bytes, so a thread streams its groups' weights front to
 * back, once, whatever M is: at M = 1 the whole matrix is one sequential read per thread. The group's
 * weights (4 * Kp bytes, a few KiB) stay in L1 while every row block of x passes over them.
 *
 * Inner products, by what the compiler was allowed (-march=native):
 * - AVX-512 VNNI: vpdpbusd multiplies u8 by s8 in groups of 4 and adds into int32 lanes. x is made
 *   unsigned by x ^ 0x80 (= x + 128), so the sum is x.w + 128 * sum_k w[n, k]; the second term, comp[n],
 *   is computed at pack time and subtracted. A zmm holds two columns' 32 k (the layout above), the x chunk
 *   is broadcast to both halves.
 * - AVX2 (llama.cpp's trick): vpmaddubsw needs one unsigned operand, so take |x| and move x's sign onto
 *   w (vpsignb); each pair sum is at most 2 * 127 * 127 < 2^15, so it never saturates; vpmaddwd with ones
 *   widens pairs to int32.
 * - otherwise plain C, so that the library builds everywhere (aarch64); slow.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "abi.h"
#include "kernels.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#define QCOLS LMSERVE_QGEMM_GROUP_COLS /* 4 */
#define QK LMSERVE_QGEMM_K_ALIGN       /* 32 */
#define ROW_BLOCK 64                   /* rows of x per work item: 64 * Kp bytes stay in L2 */

int lmserve_qgemm_isa(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512F__) && defined(__AVX512BW__)
    return 2;
#elif defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

/* One row: sx = absmax / 127; q[k] = round_even(x[k] * 127 / absmax), q[K..Kp) = 0. */
static void quantize_row(const float *x, int8_t *q, float *sx, int64_t K, int64_t Kp) {
    float amax = 0.0f;
    int64_t k = 0;
#if defined(__AVX2__)
    const __m256 sign_off = _mm256_set1_ps(-0.0f);
    __m256 vmax = _mm256_setzero_ps();
    for (; k + 8 <= K; k += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign_off, _mm256_loadu_ps(x + k)));
    float lanes[8];
    _mm256_storeu_ps(lanes, vmax);
    for (int i = 0; i < 8; i++) amax = lanes[i] > amax ? lanes[i] : amax;
#endif
    for (; k < K; k++) amax = fabsf(x[k]) > amax ? fabsf(x[k]) : amax;
    *sx = amax / 127.0f;
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    k = 0;
#if defined(__AVX2__)
    const __m256 vinv = _mm256_set1_ps(inv);
    for (; k + 32 <= K; k += 32) {
        /* cvtps rounds to nearest even (the default MXCSR mode); |x * inv| <= 127 so the packs never clip */
        const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), vinv));
        const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8), vinv));
        const __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 16), vinv));
        const __m256i d = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 24), vinv));
        const __m256i ab = _mm256_packs_epi32(a, b), cd = _mm256_packs_epi32(c, d);
        /* the packs interleave 128-bit lanes: put the 32 bytes back in k order */
        const __m256i q8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd),
                                                       _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(q + k), q8);
    }
#endif
    for (; k < K; k++) q[k] = (int8_t)lrintf(x[k] * inv);
    for (; k < Kp; k++) q[k] = 0;
}

/* Store one row's 4 column sums (int32) as floats, times the scales; only the first `ncols` columns. */
static inline void store4(float *y, const int32_t *sums, float sx, const float *sw, int64_t ncols) {
    for (int64_t j = 0; j < ncols; j++) y[j] = (float)sums[j] * sx * sw[j];
}

#if defined(__AVX2__)
static inline int32_t hsum8(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512F__) && defined(__AVX512BW__)

/* `rows` (1 or 2) rows of x against one group of 4 columns: sums[m][j] = x_m . w_j (signed). */
static inline __attribute__((always_inline)) void group_dot(const int rows, const int8_t *x, const int64_t Kp,
                                                            const int8_t *w, const int32_t *comp,
                                                            int32_t sums[2][QCOLS]) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512i acc[2][2];
    for (int m = 0; m < rows; m++) acc[m][0] = acc[m][1] = _mm512_setzero_si512();
    for (int64_t k = 0; k < Kp; k += QK) {
        const int8_t *wk = w + k * QCOLS;
        const __m512i w01 = _mm512_loadu_si512(wk), w23 = _mm512_loadu_si512(wk + 64);
        for (int m = 0; m < rows; m++) {
            const __m256i xk = _mm256_loadu_si256((const __m256i *)(x + m * Kp + k));
            const __m512i xu = _mm512_xor_si512(_mm512_broadcast_i64x4(xk), flip); /* x + 128, as u8 */
            acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], xu, w01);
            acc[m][1] = _mm512_dpbusd_epi32(acc[m][1], xu, w23);
        }
    }
    for (int m = 0; m < rows; m++)
        for (int h = 0; h < 2; h++) {
            /* lanes 0-7: column 2h, lanes 8-15: column 2h + 1 */
            sums[m][2 * h] = hsum8(_mm512_castsi512_si256(acc[m][h])) - comp[2 * h];
            sums[m][2 * h + 1] = hsum8(_mm512_extracti64x4_epi64(acc[m][h], 1)) - comp[2 * h + 1];
        }
}

#elif defined(__AVX2__)

static inline __attribute__((always_inline)) void group_dot(const int rows, const int8_t *x, const int64_t Kp,
                                                            const int8_t *w, const int32_t *comp,
                                                            int32_t sums[2][QCOLS]) {
    (void)comp;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[2][QCOLS];
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < QCOLS; j++) acc[m][j] = _mm256_setzero_si256();
    for (int64_t k = 0; k < Kp; k += QK) {
        const int8_t *wk = w + k * QCOLS;
        __m256i xs[2], ax[2];
        for (int m = 0; m < rows; m++) {
            xs[m] = _mm256_loadu_si256((const __m256i *)(x + m * Kp + k));
            ax[m] = _mm256_sign_epi8(xs[m], xs[m]); /* |x| (x = -128 never occurs) */
        }
        for (int j = 0; j < QCOLS; j++) {
            const __m256i wj = _mm256_loadu_si256((const __m256i *)(wk + j * QK));
            for (int m = 0; m < rows; m++) {
                const __m256i sw = _mm256_sign_epi8(wj, xs[m]); /* w * sign(x), 0 where x is 0 */
                const __m256i p16 = _mm256_maddubs_epi16(ax[m], sw);
                acc[m][j] = _mm256_add_epi32(acc[m][j], _mm256_madd_epi16(p16, ones));
            }
        }
    }
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < QCOLS; j++) sums[m][j] = hsum8(acc[m][j]);
}

#else

static inline void group_dot(const int rows, const int8_t *x, const int64_t Kp, const int8_t *w,
                             const int32_t *comp, int32_t sums[2][QCOLS]) {
    (void)comp;
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < QCOLS; j++) sums[m][j] = 0;
    for (int64_t k = 0; k < Kp; k += QK)
        for (int m = 0; m < rows; m++)
            for (int j = 0; j < QCOLS; j++) {
                int32_t s = 0;
                for (int i = 0; i < QK; i++) s += (int32_t)x[m * Kp + k + i] * w[k * QCOLS + j * QK + i];
                sums[m][j] += s;
            }
}

#endif

/* The work of one call inside a parallel region: first every row quantized (an orphaned `omp for`, whose
 * barrier ends the phase), then (column group, row block) items, group-major, so a thread reads each of
 * its groups' weights from memory once. */
static void qgemm_team(const float *x, int8_t *xq, float *sx, const int8_t *packed, const float *scales,
                       const int32_t *comp, float *y, int64_t M, int64_t N, int64_t K, int64_t Kp) {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++) quantize_row(x + m * K, xq + m * Kp, sx + m, K, Kp);
    const int64_t groups = (N + QCOLS - 1) / QCOLS;
    const int64_t row_blocks = (M + ROW_BLOCK - 1) / ROW_BLOCK;
    const int64_t items = groups * row_blocks;
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; item++) {
        const int64_t g = item / row_blocks, m0 = (item % row_blocks) * ROW_BLOCK;
        const int64_t m1 = m0 + ROW_BLOCK < M ? m0 + ROW_BLOCK : M;
        const int64_t n0 = g * QCOLS, ncols = N - n0 < QCOLS ? N - n0 : QCOLS;
        const int8_t *w = packed + g * Kp * QCOLS;
        int32_t sums[2][QCOLS];
        int64_t m = m0;
        for (; m + 2 <= m1; m += 2) {
            group_dot(2, xq + m * Kp, Kp, w, comp + n0, sums);
            store4(y + m * N + n0, sums[0], sx[m], scales + n0, ncols);
            store4(y + (m + 1) * N + n0, sums[1], sx[m + 1], scales + n0, ncols);
        }
        if (m < m1) {
            group_dot(1, xq + m * Kp, Kp, w, comp + n0, sums);
            store4(y + m * N + n0, sums[0], sx[m], scales + n0, ncols);
        }
    }
}

int quantize_rows_int8(const float *x, int8_t *xq, float *sx, int64_t M, int64_t K, int64_t Kp, int num_threads) {
    int threads = num_threads < 1 ? 1 : num_threads;
    if (threads > M) threads = M < 1 ? 1 : (int)M;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t m = 0; m < M; m++) quantize_row(x + m * K, xq + m * Kp, sx + m, K, Kp);
    return 0;
}

int qgemm_int8(const float *x, const int8_t *packed, const float *scales, const int32_t *comp, float *y, int64_t M,
               int64_t N, int64_t K, int num_threads) {
    const int64_t Kp = (K + QK - 1) / QK * QK;
    int8_t *xq = malloc((size_t)(M * Kp));
    float *sx = malloc((size_t)M * sizeof(float));
    if (xq == NULL || sx == NULL) {
        free(xq);
        free(sx);
        return 1;
    }
    const int64_t groups = (N + QCOLS - 1) / QCOLS;
    int threads = num_threads < 1 ? 1 : num_threads;
    if (threads > groups) threads = (int)groups;
#pragma omp parallel num_threads(threads)
    qgemm_team(x, xq, sx, packed, scales, comp, y, M, N, K, Kp);
    free(xq);
    free(sx);
    return 0;
}
