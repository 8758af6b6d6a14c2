/* int8 matrix multiply for `--quantization int8` (float32 activations on CPU):
 *
 *   qgemm_int8  y[M, N] = sum_b (q(x)[m, b] . W_q[n, b]) * sx[m, b] * sw[n], float32 out
 *
 * W_q holds symmetric int8 weights, one float scale per output channel (|W[n, :]|max / 127), quantized
 * once at load (native_kernels.quantize_weight). Each call quantizes the activations itself, fused in one
 * pass per row: symmetric int8 with one scale per block b of 32 values along K (sx[m, b] = the block's
 * |x|max / 127; round to nearest even), as llama.cpp's Q8_0 activations. Why blocks and not one scale per
 * row: a row's outliers (the residual stream's, after RMSNorm) set a per-row scale so coarse that the rest
 * of the row loses most of its bits; on SmolLM2-135M per-row scales raised perplexity 4.7%, blocks of 32
 * 0.5-0.9% (benchmarks/perplexity.py; the int8 weights alone 0.3%). Within a block the products sum exactly in
 * int32, then converted to float and accumulated with the block's scale; sw[n] multiplies the total, and
 * the bias, where there is one, is added to that (as torch's `y += bias` would).
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
 * Inner products (u8 x s8 instructions need one unsigned operand: take |x| and move x's sign onto w,
 * llama.cpp's trick; |x|, |w| <= 127, so nothing saturates), by what the compiler was allowed
 * (-march=native):
 * - AVX-512 VNNI: vpdpbusd (u8 x s8 in groups of 4 into int32 lanes); AVX-512 has no vpsignb, so w is
 *   negated under the mask of x's sign bits. A zmm holds two columns' 32 k (the layout above), the x
 *   block is broadcast to both halves. (The +128 offset with a precomputed weight-sum correction would
 *   need one correction per column and block, as the activation scale changes per block.)
 * - AVX2: vpsignb, vpmaddubsw (pairs into int16, at most 2 * 127^2 < 2^15), vpmaddwd with ones (int32).
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
#elif defined(__AVX2__) && defined(__FMA__)
    return 1;
#else
    return 0;
#endif
}

/* One row: per 32-value block b, sx[b] = |x_b|max / 127 and q = round_even(x * 127 / |x_b|max); the
 * padding K..Kp is zero (its block scale too, where the whole block is padding). qgemm_gguf.c's activations
 * too (kernels.h). */
void quantize_row_int8(const float *x, int8_t *q, float *sx, int64_t K, int64_t Kp) {
    int64_t k = 0;
#if defined(__AVX2__)
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    for (; k + QK <= K; k += QK) {
        const __m256 a = _mm256_loadu_ps(x + k), b = _mm256_loadu_ps(x + k + 8);
        const __m256 c = _mm256_loadu_ps(x + k + 16), d = _mm256_loadu_ps(x + k + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign_bit, a), _mm256_andnot_ps(sign_bit, b)),
                                 _mm256_max_ps(_mm256_andnot_ps(sign_bit, c), _mm256_andnot_ps(sign_bit, d)));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        const float amax = _mm_cvtss_f32(h);
        sx[k / QK] = amax / 127.0f;
        const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        /* cvtps rounds to nearest even (the default MXCSR mode); |x * inv| <= 127 so the packs never clip */
        const __m256i ab = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(a, inv)),
                                              _mm256_cvtps_epi32(_mm256_mul_ps(b, inv)));
        const __m256i cd = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(c, inv)),
                                              _mm256_cvtps_epi32(_mm256_mul_ps(d, inv)));
        /* the packs interleave 128-bit lanes: put the 32 bytes back in k order */
        const __m256i q8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd),
                                                       _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(q + k), q8);
    }
#endif
    for (; k < Kp; k += QK) { /* the blocks left: all of them without AVX2, else the last partial one */
        const int64_t end = k + QK < K ? k + QK : K;
        float amax = 0.0f;
        for (int64_t i = k; i < end; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
        sx[k / QK] = amax / 127.0f;
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int64_t i = k;
        for (; i < end; i++) q[i] = (int8_t)lrintf(x[i] * inv);
        for (; i < k + QK; i++) q[i] = 0;
    }
}

#if defined(__AVX2__)
static inline float hsum8f(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512F__) && defined(__AVX512BW__)

/* `rows` (1 or 2) rows of x against one group of 4 columns: sums[m][j] = sum_b (x_mb . w_jb) * sx[m, b]. */
static inline __attribute__((always_inline)) void group_dot(const int rows, const int8_t *x, const float *sx,
                                                            const int64_t Kp, const int8_t *w, float sums[2][QCOLS]) {
    const int64_t nb = Kp / QK;
    __m512 acc[2][2];
    for (int m = 0; m < rows; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *wk = w + b * QK * QCOLS;
        const __m512i w01 = _mm512_loadu_si512(wk), w23 = _mm512_loadu_si512(wk + 64);
        for (int m = 0; m < rows; m++) {
            const __m512i xb = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(x + m * Kp + b * QK)));
            const __mmask64 neg = _mm512_movepi8_mask(xb);
            const __m512i ax = _mm512_abs_epi8(xb);
            const __m512 scale = _mm512_set1_ps(sx[m * nb + b]);
            const __m512i p01 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ax,
                                                    _mm512_mask_sub_epi8(w01, neg, _mm512_setzero_si512(), w01));
            const __m512i p23 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ax,
                                                    _mm512_mask_sub_epi8(w23, neg, _mm512_setzero_si512(), w23));
            acc[m][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p01), scale, acc[m][0]);
            acc[m][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p23), scale, acc[m][1]);
        }
    }
    for (int m = 0; m < rows; m++)
        for (int h = 0; h < 2; h++) { /* lanes 0-7: column 2h, lanes 8-15: column 2h + 1 */
            sums[m][2 * h] = hsum8f(_mm512_castps512_ps256(acc[m][h]));
            sums[m][2 * h + 1] = hsum8f(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[m][h]), 1)));
        }
}

#elif defined(__AVX2__) && defined(__FMA__)

static inline __attribute__((always_inline)) void group_dot(const int rows, const int8_t *x, const float *sx,
                                                            const int64_t Kp, const int8_t *w, float sums[2][QCOLS]) {
    const int64_t nb = Kp / QK;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[2][QCOLS];
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < QCOLS; j++) acc[m][j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *wk = w + b * QK * QCOLS;
        __m256i xs[2], ax[2];
        __m256 scale[2];
        for (int m = 0; m < rows; m++) {
            xs[m] = _mm256_loadu_si256((const __m256i *)(x + m * Kp + b * QK));
            ax[m] = _mm256_sign_epi8(xs[m], xs[m]); /* |x| (x = -128 never occurs) */
            scale[m] = _mm256_set1_ps(sx[m * nb + b]);
        }
        for (int j = 0; j < QCOLS; j++) {
            const __m256i wj = _mm256_loadu_si256((const __m256i *)(wk + j * QK));
            for (int m = 0; m < rows; m++) {
                const __m256i sw = _mm256_sign_epi8(wj, xs[m]); /* w * sign(x), 0 where x is 0 */
                const __m256i p32 = _mm256_madd_epi16(_mm256_maddubs_epi16(ax[m], sw), ones);
                acc[m][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), scale[m], acc[m][j]);
            }
        }
    }
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < QCOLS; j++) sums[m][j] = hsum8f(acc[m][j]);
}

#else

static inline void group_dot(const int rows, const int8_t *x, const float *sx, const int64_t Kp, const int8_t *w,
                             float sums[2][QCOLS]) {
    const int64_t nb = Kp / QK;
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < QCOLS; j++) sums[m][j] = 0.0f;
    for (int64_t b = 0; b < nb; b++)
        for (int m = 0; m < rows; m++)
            for (int j = 0; j < QCOLS; j++) {
                int32_t s = 0;
                for (int i = 0; i < QK; i++) s += (int32_t)x[m * Kp + b * QK + i] * w[b * QK * QCOLS + j * QK + i];
                sums[m][j] += (float)s * sx[m * nb + b];
            }
}

#endif

/* Store one row's 4 column sums times the column scales (+ the bias); only the first `ncols` columns. */
static inline void store4(float *y, const float *sums, const float *sw, const float *bias, int64_t ncols) {
    for (int64_t j = 0; j < ncols; j++) y[j] = bias == NULL ? sums[j] * sw[j] : sums[j] * sw[j] + bias[j];
}

/* The work of one call inside a parallel region (kernels.h): first every row quantized (an orphaned `omp for`,
 * whose barrier ends the phase), then (column group, row block) items, group-major, so a thread reads each of
 * its groups' weights from memory once. */
void qgemm_int8_team(const float *x, int8_t *xq, float *sx, const int8_t *packed, const float *scales,
                     const float *bias, float *y, int64_t M, int64_t N, int64_t K) {
    const int64_t Kp = (K + QK - 1) / QK * QK, nb = Kp / QK;
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++) quantize_row_int8(x + m * K, xq + m * Kp, sx + m * nb, K, Kp);
    const int64_t groups = (N + QCOLS - 1) / QCOLS;
    const int64_t row_blocks = (M + ROW_BLOCK - 1) / ROW_BLOCK;
    const int64_t items = groups * row_blocks;
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; item++) {
        const int64_t g = item / row_blocks, m0 = (item % row_blocks) * ROW_BLOCK;
        const int64_t m1 = m0 + ROW_BLOCK < M ? m0 + ROW_BLOCK : M;
        const int64_t n0 = g * QCOLS, ncols = N - n0 < QCOLS ? N - n0 : QCOLS;
        const int8_t *w = packed + g * Kp * QCOLS;
        const float *b = bias == NULL ? NULL : bias + n0;
        float sums[2][QCOLS];
        int64_t m = m0;
        for (; m + 2 <= m1; m += 2) {
            group_dot(2, xq + m * Kp, sx + m * nb, Kp, w, sums);
            store4(y + m * N + n0, sums[0], scales + n0, b, ncols);
            store4(y + (m + 1) * N + n0, sums[1], scales + n0, b, ncols);
        }
        if (m < m1) {
            group_dot(1, xq + m * Kp, sx + m * nb, Kp, w, sums);
            store4(y + m * N + n0, sums[0], scales + n0, b, ncols);
        }
    }
}

int quantize_rows_int8(const float *x, int8_t *xq, float *sx, int64_t M, int64_t K, int64_t Kp, int num_threads) {
    int threads = num_threads < 1 ? 1 : num_threads;
    if (threads > M) threads = M < 1 ? 1 : (int)M;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t m = 0; m < M; m++) quantize_row_int8(x + m * K, xq + m * Kp, sx + m * (Kp / QK), K, Kp);
    return 0;
}

int qgemm_int8(const float *x, const int8_t *packed, const float *scales, const float *bias, float *y, int64_t M,
               int64_t N, int64_t K, int num_threads) {
    const int64_t Kp = (K + QK - 1) / QK * QK;
    int8_t *xq = malloc((size_t)(M * Kp));
    float *sx = malloc((size_t)(M * (Kp / QK)) * sizeof(float));
    if (xq == NULL || sx == NULL) {
        free(xq);
        free(sx);
        return 1;
    }
    const int64_t groups = (N + QCOLS - 1) / QCOLS;
    int threads = num_threads < 1 ? 1 : num_threads;
    if (threads > groups) threads = (int)groups;
#pragma omp parallel num_threads(threads)
    qgemm_int8_team(x, xq, sx, packed, scales, bias, y, M, N, K);
    free(xq);
    free(sx);
    return 0;
}
