/* int8 weights with bf16 activations (`--quantization int8` with --dtype bfloat16, the default where the CPU
 * has AVX-512 BF16 and VNNI):
 *
 *   qgemm_vnni   y[M, N] = bf16( sum_b (q(x)[m, b] . Wq[n, b]) * sx[m, b] * sw[n] (+ bias[n]) ); or the float32
 *                sums themselves into y_f32 (the LM head's logits); or, with silu_mul, an MLP's activation
 *                y[M, N/2] = silu(gate) * up in the same pass, as gemm.c's
 *
 * Weights: symmetric int8 per output channel (sw[n] = |W[n, :]|max / 127), as qgemm.c's. Activations: each
 * call quantizes its bf16 rows, symmetric int8 with one scale per block of 32 along K (sx[m, b] = the
 * block's |x|max / 127, round to nearest even), the formula of qgemm.c's quantize_row_int8: per-row scales
 * cost SmolLM2-135M 4.7% perplexity, blocks of 32 under 1% (see qgemm.c).
 *
 * Why: vpdpbusd does 64 multiply-adds per instruction, vdpbf16ps 32, and int8 weights are half bf16's
 * bytes: at one row the step reads half the memory, at many rows it does half the instructions.
 *
 * The unsigned-offset trick: vpdpbusd multiplies unsigned bytes by signed ones. The weights are stored
 * plus 128 (u8 in [1, 255]), the activations stay signed, and
 *     sum_k (w + 128) x = sum_k w x + 128 sum_k x,
 * so each (row, block) sum starts from -128 * sum_k x (cx[m, b], computed while the row is quantized) and
 * comes out exact in int32 (8 groups of 4 products of at most 255 * 127). The correction is per row and
 * block, shared by every column, so the inner loop is the bare vpdpbusd. The alternative, llama.cpp's sign
 * trick (|x| unsigned, x's sign moved onto w), needs a masked negate of w per row and instruction on
 * AVX-512, which has no vpsignb: loadtests/int8_ops_bench.c measures both.
 *
 * Packed weight layout (qgemm_vnni.py's pack_vnni): groups of 32 output columns, each group
 * [Kp / 4][32][4] u8, Kp = K rounded up to 32, N rounded up to 32 (zero weights, i.e. 128, and zero
 * scales): one k-step of 4 is 128 contiguous bytes, two zmm of 16 columns x 4 k, vpdpbusd's operand layout;
 * a thread streams its groups front to back. A gate/up weight packed for silu_mul has gate columns
 * [16g, 16g + 16) in group g's first zmm and the matching up columns in its second; the bias stays in its
 * own order (gate half, then up half).
 * A register block is 6 rows x 32 columns: 12 int32 sums of the current block of 32 k, 12 float32 totals.
 * Work is split over (column group, row block) items, group-major, as gemm.c's, so a thread reads a
 * group's weights from memory once and finds them in L1/L2 for its other row blocks; at one row block
 * per group (up to 6 rows) the split is over groups alone, each thread streaming its share of the weights.
 */
#include <stdint.h>
#include <string.h>

#include "abi.h"
#include "bf16.h"
#include "fast_exp.h"
#include "kernels.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)

#define VCOLS LMSERVE_VNNI_GROUP_COLS /* 32 */
#define VK LMSERVE_QGEMM_K_ALIGN       /* 32 */
#define VROWS 6

int lmserve_has_int8_bf16(void) { return 1; }

/* One bf16 row: per block b of 32, sx[b] = |x_b|max / 127, q = round_even(x * (127 / |x_b|max)), and
 * cx[b] = -128 * sum(q); zero past K up to Kp. */
static void quantize_row_bf16(const bf16 *x, int8_t *q, float *sx, int32_t *cx, int64_t K, int64_t Kp) {
    for (int64_t k = 0; k < Kp; k += VK) {
        const int64_t n = K - k < VK ? K - k : VK; /* > 0: Kp is K rounded up to 32 */
        const __m512 a = load16_bf16(x + k, mask16(n)), b = load16_bf16(x + k + 16, mask16(n > 16 ? n - 16 : 0));
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        sx[k / VK] = amax / 127.0f;
        const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        /* vcvtps2dq rounds to nearest even (the default MXCSR mode); |x * inv| <= 127 */
        const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
        _mm_storeu_si128((__m128i *)(q + k), _mm512_cvtsepi32_epi8(qa));
        _mm_storeu_si128((__m128i *)(q + k + 16), _mm512_cvtsepi32_epi8(qb));
        cx[k / VK] = -128 * _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
    }
}

/* `rows` rows of quantized x against one group: acc[m][j] = sum_b (x_mb . w_b) * sx[m, b], lanes = the
 * group's columns 16j..16j+15. */
static inline __attribute__((always_inline)) void block(const int rows, const int8_t *xq, const float *sx,
                                                        const int32_t *cx, const int64_t Kp, const uint8_t *w,
                                                        __m512 acc[VROWS][2], const char *pf, const int64_t pf_lines) {
    const int64_t nb = Kp / VK;
    const int64_t pf_per_block = (pf_lines + nb - 1) / nb;
    int64_t pf_done = 0;
#pragma GCC unroll 6
    for (int m = 0; m < rows; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512i s[VROWS][2];
#pragma GCC unroll 6
        for (int m = 0; m < rows; m++) s[m][0] = s[m][1] = _mm512_set1_epi32(cx[m * nb + b]);
        const uint8_t *wb = w + b * VK * VCOLS;
        for (int64_t i = 0; i < pf_per_block && pf_done < pf_lines; i++, pf_done++) _mm_prefetch(pf + 64 * pf_done, _MM_HINT_T0);
#pragma GCC unroll 8
        for (int p = 0; p < VK / 4; p++) {
            const __m512i w0 = _mm512_loadu_si512(wb + p * 4 * VCOLS), w1 = _mm512_loadu_si512(wb + p * 4 * VCOLS + 64);
#pragma GCC unroll 6
            for (int m = 0; m < rows; m++) {
                int32_t quad;
                memcpy(&quad, xq + m * Kp + b * VK + 4 * p, sizeof quad);
                const __m512i xb = _mm512_set1_epi32(quad);
                s[m][0] = _mm512_dpbusd_epi32(s[m][0], w0, xb);
                s[m][1] = _mm512_dpbusd_epi32(s[m][1], w1, xb);
            }
        }
#pragma GCC unroll 6
        for (int m = 0; m < rows; m++) {
            const __m512 scale = _mm512_set1_ps(sx[m * nb + b]);
            acc[m][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[m][0]), scale, acc[m][0]);
            acc[m][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[m][1]), scale, acc[m][1]);
        }
    }
}

/* A block's sums out: times the column scales, plus the bias, to y (bf16) or y_f32, or through SiLU. */
static inline __attribute__((always_inline)) void store(const int rows, __m512 acc[VROWS][2], const float *sw,
                                                        const bf16 *bias, const bf16 *up_bias, bf16 *y,
                                                        float *yf, const int64_t ldy, const int64_t ncols,
                                                        const int silu) {
    if (silu) { /* lanes of acc[m][0]: gate, acc[m][1]: the matching up; y gets 16 activations per row */
        const __m512 sg = _mm512_loadu_ps(sw), su = _mm512_loadu_ps(sw + 16);
        const __m512 bg = bias == NULL ? _mm512_setzero_ps() : load16_bf16(bias, 0xffff);
        const __m512 bu = bias == NULL ? _mm512_setzero_ps() : load16_bf16(up_bias, 0xffff);
#pragma GCC unroll 6
        for (int m = 0; m < rows; m++) {
            const __m512 g = round16_bf16(_mm512_fmadd_ps(acc[m][0], sg, bg));
            const __m512 u = round16_bf16(_mm512_fmadd_ps(acc[m][1], su, bu));
            store16_bf16(y + m * ldy, 0xffff, silu_mul16(g, u));
        }
        return;
    }
#pragma GCC unroll 2
    for (int j = 0; j < 2; j++) {
        const int64_t c0 = j * 16;
        if (c0 >= ncols) break;
        const __mmask16 mask = mask16(ncols - c0);
        const __m512 scale = _mm512_loadu_ps(sw + c0); /* the scales are padded to the group */
        const __m512 b = bias == NULL ? _mm512_setzero_ps() : load16_bf16(bias + c0, mask);
#pragma GCC unroll 6
        for (int m = 0; m < rows; m++) {
            const __m512 r = _mm512_fmadd_ps(acc[m][j], scale, b);
            if (yf != NULL)
                _mm512_mask_storeu_ps(yf + m * ldy + c0, mask, r);
            else
                store16_bf16(y + m * ldy + c0, mask, r);
        }
    }
}

void qgemm_vnni_team(const bf16 *x, int8_t *xq, float *sx, int32_t *cx, const uint8_t *packed, const float *scales,
                     const bf16 *bias, bf16 *y, float *y_f32, int64_t M, int64_t N, int64_t K, int silu_mul) {
    const int64_t Kp = (K + VK - 1) / VK * VK, nb = Kp / VK;
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++) quantize_row_bf16(x + m * K, xq + m * Kp, sx + m * nb, cx + m * nb, K, Kp);
    const int64_t groups = (N + VCOLS - 1) / VCOLS;
    const int64_t row_blocks = (M + VROWS - 1) / VROWS;
    const int64_t items = groups * row_blocks;
    const int64_t ldy = silu_mul ? N / 2 : N;
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; item++) {
        const int64_t g = item / row_blocks, m0 = (item % row_blocks) * VROWS;
        const int64_t n0 = g * VCOLS, ncols = N - n0 < VCOLS ? N - n0 : VCOLS;
        const uint8_t *w = packed + g * Kp * VCOLS;
        const int8_t *xr = xq + m0 * Kp;
        const float *sxr = sx + m0 * nb;
        const int32_t *cxr = cx + m0 * nb;
        /* silu_mul: group g holds gate and up columns 16g..16g+15 (their biases at 16g and N/2 + 16g) */
        const bf16 *b = bias == NULL ? NULL : bias + (silu_mul ? g * 16 : n0);
        const bf16 *ub = bias == NULL || !silu_mul ? NULL : bias + N / 2 + g * 16;
        bf16 *yr = y_f32 != NULL ? NULL : y + m0 * ldy + (silu_mul ? g * 16 : n0);
        float *yfr = y_f32 == NULL ? NULL : y_f32 + m0 * N + n0;
        /* With several row blocks per group, the next group's weights, a share per row block, fetched while
         * this group computes (gemm.c's way), so that every pass but a group's first finds its weights in
         * cache (a decode step of 64 sequences 4% faster). With one row block the hardware's prefetch of
         * the plain stream does better alone: software prefetch on top cost a one-row step 20%. */
        const char *pf = NULL;
        int64_t pf_lines = 0;
        if (row_blocks > 1 && g + 1 < groups) {
            const int64_t r = item % row_blocks, group_lines = Kp * VCOLS / 64;
            const int64_t first = group_lines * r / row_blocks, last = group_lines * (r + 1) / row_blocks;
            pf = (const char *)(packed + (g + 1) * Kp * VCOLS) + 64 * first;
            pf_lines = last - first;
        }
        __m512 acc[VROWS][2];
        switch (M - m0 < VROWS ? M - m0 : VROWS) { /* constant row counts: fully unrolled blocks */
        case 6: block(6, xr, sxr, cxr, Kp, w, acc, pf, pf_lines); store(6, acc, scales + n0, b, ub, yr, yfr, ldy, ncols, silu_mul); break;
        case 5: block(5, xr, sxr, cxr, Kp, w, acc, pf, pf_lines); store(5, acc, scales + n0, b, ub, yr, yfr, ldy, ncols, silu_mul); break;
        case 4: block(4, xr, sxr, cxr, Kp, w, acc, pf, pf_lines); store(4, acc, scales + n0, b, ub, yr, yfr, ldy, ncols, silu_mul); break;
        case 3: block(3, xr, sxr, cxr, Kp, w, acc, pf, pf_lines); store(3, acc, scales + n0, b, ub, yr, yfr, ldy, ncols, silu_mul); break;
        case 2: block(2, xr, sxr, cxr, Kp, w, acc, pf, pf_lines); store(2, acc, scales + n0, b, ub, yr, yfr, ldy, ncols, silu_mul); break;
        default: block(1, xr, sxr, cxr, Kp, w, acc, pf, pf_lines); store(1, acc, scales + n0, b, ub, yr, yfr, ldy, ncols, silu_mul); break;
        }
    }
}

int quantize_rows_bf16(const bf16 *x, int8_t *xq, float *sx, int32_t *cx, int64_t M, int64_t K, int num_threads) {
    const int64_t Kp = (K + VK - 1) / VK * VK;
#pragma omp parallel for num_threads(num_threads < 1 ? 1 : num_threads) schedule(static)
    for (int64_t m = 0; m < M; m++) quantize_row_bf16(x + m * K, xq + m * Kp, sx + m * (Kp / VK), cx + m * (Kp / VK), K, Kp);
    return 0;
}

int qgemm_vnni(const bf16 *x, const uint8_t *packed, const float *scales, const bf16 *bias, bf16 *y, float *y_f32,
               int64_t M, int64_t N, int64_t K, int silu_mul, int num_threads) {
    const int64_t Kp = (K + VK - 1) / VK * VK, nb = Kp / VK;
    int8_t *xq = malloc((size_t)(M * Kp));
    float *sx = malloc(sizeof(float) * (size_t)(M * nb));
    int32_t *cx = malloc(sizeof(int32_t) * (size_t)(M * nb));
    if (xq == NULL || sx == NULL || cx == NULL) {
        free(xq), free(sx), free(cx);
        return 1;
    }
    const int64_t items = (N + VCOLS - 1) / VCOLS * ((M + VROWS - 1) / VROWS);
    int threads = num_threads < 1 ? 1 : num_threads;
    if (threads > items) threads = (int)items;
#pragma omp parallel num_threads(threads)
    qgemm_vnni_team(x, xq, sx, cx, packed, scales, bias, y, y_f32, M, N, K, silu_mul);
    free(xq), free(sx), free(cx);
    return 0;
}

#else /* no AVX-512 VNNI and BF16 on the machine that built this: int8 runs with float32 activations (qgemm.c) */

int lmserve_has_int8_bf16(void) { return 0; }

void qgemm_vnni_team(const bf16 *x, int8_t *xq, float *sx, int32_t *cx, const uint8_t *packed, const float *scales,
                     const bf16 *bias, bf16 *y, float *y_f32, int64_t M, int64_t N, int64_t K, int silu_mul) {
    (void)x, (void)xq, (void)sx, (void)cx, (void)packed, (void)scales, (void)bias, (void)y, (void)y_f32, (void)M;
    (void)N, (void)K, (void)silu_mul;
}

int quantize_rows_bf16(const bf16 *x, int8_t *xq, float *sx, int32_t *cx, int64_t M, int64_t K, int num_threads) {
    (void)x, (void)xq, (void)sx, (void)cx, (void)M, (void)K, (void)num_threads;
    return 2;
}

int qgemm_vnni(const bf16 *x, const uint8_t *packed, const float *scales, const bf16 *bias, bf16 *y, float *y_f32,
               int64_t M, int64_t N, int64_t K, int silu_mul, int num_threads) {
    (void)x, (void)packed, (void)scales, (void)bias, (void)y, (void)y_f32, (void)M, (void)N, (void)K, (void)silu_mul;
    (void)num_threads;
    return 2; /* nothing computed; qgemm_vnni.py never calls it here (has_int8_bf16 is false) */
}

#endif
