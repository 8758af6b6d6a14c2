/* bf16 matrix multiply for the projections of a decode step on CPUs with AVX-512 BF16 (no AMX):
 *
 *   gemm_bf16   y[M, N] = bf16(x[M, K] @ W[N, K]^T (+ bias)), float32 accumulation; or, given y_f32,
 *               the float32 sums themselves (the LM head's logits: no rounding, no conversion after);
 *               or, with silu_mul, an MLP's activation y[M, N/2] = silu(gate) * up from its fused gate/up
 *               weight, packed with gate and up columns interleaved (below), in the same pass
 *
 * Why our own: a decode step multiplies a few rows (one per sequence) by every weight of the model.
 * With few rows the weights' bytes set the pace, and oneDNN's bf16 path streamed them here at about
 * half the rate the memory allows (16 of ~30 GB/s); with more rows the arithmetic does, and this
 * kernel keeps vdpbf16ps busy (~400 of the core pair's ~440 GFLOP/s from 16 rows up, oneDNN 250-370).
 * benchmarks/kernel_bench.py measures both on this machine's shapes.
 *
 * W is packed once, at load (native_kernels.pack_weight): groups of 64 output columns, each group
 * [K/2][64][2], so one k-pair of a group is 256 contiguous bytes: four zmm loads whose 16 lanes each
 * hold (W[n, 2p], W[n, 2p+1]), the operand layout of vdpbf16ps. Columns past N are zero padding.
 * A gate/up weight packed for silu_mul has gate columns [32g, 32g + 32) as group g's first 32 and the
 * matching up columns as its last 32, so a block holds both halves of its 32 activations: it rounds each to
 * bf16 and applies fast_exp.h's silu_mul16, exactly what the separate gemm and silu_mul would compute,
 * without writing the [M, N] gate/up rows out and reading them back (half of which the other core wrote).
 * A register block is 6 rows x 64 columns (24 accumulators); each x pair is broadcast from memory.
 * Work is split over (column group, row block) pairs, group-major, so a thread reuses a group's
 * weights from its cache for every row block it owns, and fetches the next group's (software prefetch)
 * while it computes.
 */
#include <stdint.h>

#include "abi.h"
#include "bf16.h"
#include "fast_exp.h"
#include "kernels.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)

#define GROUP_COLS LMSERVE_GEMM_GROUP_COLS
#define BLOCK_ROWS 6

int lmserve_has_avx512_bf16(void) { return 1; }

/* A block's walk through the memory it fetches ahead: `per8` cache lines every eight k-pairs. */
typedef struct {
    const char *next, *end;
    int per8;
} prefetch_cursor;

static inline __attribute__((always_inline)) void prefetch_some(prefetch_cursor *c) {
    for (int i = 0; i < c->per8 && c->next < c->end; i++, c->next += 64) _mm_prefetch(c->next, _MM_HINT_T1);
}

static inline __attribute__((always_inline)) void block(const int rows, const bf16 *x, const int64_t K,
                                                        const bf16 *w, const bf16 *bias, bf16 *y, float *yf,
                                                        const int64_t ldy, const int64_t ncols, const int silu,
                                                        prefetch_cursor *wpf, const float scale,
                                                        const int accumulate, const int zmms) {
    /* zmms: 16-column vectors per group, 4 (a weight's 64-column groups) or 1 (LoRA's A factors, whose
     * few columns would be mostly padding in groups of 64); every caller passes a constant. */
    __m512 acc[BLOCK_ROWS][4];
#pragma GCC unroll 6
    for (int m = 0; m < rows; m++)
#pragma GCC unroll 4
        for (int j = 0; j < zmms; j++) acc[m][j] = _mm512_setzero_ps();
    const int64_t pairs = K / 2;
    for (int64_t p = 0; p < pairs; p++) {
        if ((p & 7) == 0 && wpf != NULL) prefetch_some(wpf);
        const bf16 *wp = w + p * (2 * 16 * zmms);
        __m512bh wv[4];
#pragma GCC unroll 4
        for (int j = 0; j < zmms; j++) wv[j] = (__m512bh)_mm512_loadu_si512(wp + 32 * j);
#pragma GCC unroll 6
        for (int m = 0; m < rows; m++) {
            int32_t pair;
            __builtin_memcpy(&pair, x + m * K + 2 * p, sizeof pair);
            const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
            for (int j = 0; j < zmms; j++) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], a, wv[j]);
        }
    }
    if (silu) { /* a full group: lanes 0-31 gate, 32-63 up; y gets 32 activations per row */
#pragma GCC unroll 2
        for (int j = 0; j < 2; j++) {
            const __m512 bg = bias == NULL ? _mm512_setzero_ps() : load16_bf16(bias + j * 16, 0xffff);
            const __m512 bu = bias == NULL ? _mm512_setzero_ps() : load16_bf16(bias + 32 + j * 16, 0xffff);
#pragma GCC unroll 6
            for (int m = 0; m < rows; m++) {
                const __m512 g = round16_bf16(_mm512_add_ps(acc[m][j], bg));
                const __m512 u = round16_bf16(_mm512_add_ps(acc[m][j + 2], bu));
                store16_bf16(y + m * ldy + j * 16, 0xffff, silu_mul16(g, u));
            }
        }
        return;
    }
#pragma GCC unroll 4
    for (int j = 0; j < zmms; j++) {
        const int64_t c0 = j * 16;
        if (c0 >= ncols) break;
        const __mmask16 mask = mask16(ncols - c0);
        const __m512 b = bias == NULL ? _mm512_setzero_ps() : load16_bf16(bias + c0, mask);
#pragma GCC unroll 6
        for (int m = 0; m < rows; m++) {
            __m512 r = _mm512_add_ps(acc[m][j], b);
            if (scale != 1.0f) r = _mm512_mul_ps(r, _mm512_set1_ps(scale));
            if (accumulate) r = _mm512_add_ps(r, load16_bf16(y + m * ldy + c0, mask)); /* y += (LoRA) */
            if (yf != NULL)
                _mm512_mask_storeu_ps(yf + m * ldy + c0, mask, r);
            else
                store16_bf16(y + m * ldy + c0, mask, r);
        }
    }
}

/* The work of one call, split over the threads of the parallel region the caller is in (an orphaned
 * `omp for`, so its closing barrier ends the phase): gemm_bf16 opens one per call, decoder.c one per step.
 * silu_mul: W is a gate/up weight packed interleaved (N a multiple of 64), y is [M, N/2], y_f32 NULL. */
void gemm_bf16_team(const bf16 *x, const bf16 *packed, const bf16 *bias, bf16 *y, float *y_f32, int64_t M,
                    int64_t N, int64_t K, int silu_mul) {
    const int64_t groups = (N + GROUP_COLS - 1) / GROUP_COLS;
    const int64_t row_blocks = (M + BLOCK_ROWS - 1) / BLOCK_ROWS;
    const int64_t items = groups * row_blocks;
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; item++) {
        const int64_t g = item / row_blocks, m0 = (item % row_blocks) * BLOCK_ROWS;
        const int64_t n0 = g * GROUP_COLS;
        const int64_t ncols = N - n0 < GROUP_COLS ? N - n0 : GROUP_COLS;
        const bf16 *w = packed + g * K * GROUP_COLS, *b = bias == NULL ? NULL : bias + n0;
        const bf16 *xr = x + m0 * K;
        const int64_t ldy = silu_mul ? N / 2 : N;
        bf16 *yr = y_f32 != NULL ? NULL : y + m0 * ldy + (silu_mul ? n0 / 2 : n0);
        float *yfr = y_f32 == NULL ? NULL : y_f32 + m0 * N + n0;
        /* With several row blocks per group, only the first pass over a group's weights comes from memory
         * (the others find them in L2), and it waits on them. Fetch the next group's weights during this
         * group's passes instead, a share per pass, so that every pass finds its weights in L2. */
        prefetch_cursor wcursor, *wpf = NULL;
        if (row_blocks > 1 && g + 1 < groups) {
            const int64_t r = item % row_blocks, group_lines = K * GROUP_COLS * (int64_t)sizeof(bf16) / 64;
            const int64_t first = group_lines * r / row_blocks, last = group_lines * (r + 1) / row_blocks;
            const int64_t rounds = (K / 2 + 7) / 8;
            const char *next_group = (const char *)(packed + (g + 1) * K * GROUP_COLS);
            wcursor = (prefetch_cursor){next_group + first * 64, next_group + last * 64,
                                        (int)((last - first + rounds - 1) / rounds)};
            wpf = last > first ? &wcursor : NULL;
        }
        switch (M - m0 < BLOCK_ROWS ? M - m0 : BLOCK_ROWS) { /* constant row counts: fully unrolled blocks */
        case 6: block(6, xr, K, w, b, yr, yfr, ldy, ncols, silu_mul, wpf, 1.0f, 0, 4); break;
        case 5: block(5, xr, K, w, b, yr, yfr, ldy, ncols, silu_mul, wpf, 1.0f, 0, 4); break;
        case 4: block(4, xr, K, w, b, yr, yfr, ldy, ncols, silu_mul, wpf, 1.0f, 0, 4); break;
        case 3: block(3, xr, K, w, b, yr, yfr, ldy, ncols, silu_mul, wpf, 1.0f, 0, 4); break;
        case 2: block(2, xr, K, w, b, yr, yfr, ldy, ncols, silu_mul, wpf, 1.0f, 0, 4); break;
        default: block(1, xr, K, w, b, yr, yfr, ldy, ncols, silu_mul, wpf, 1.0f, 0, 4); break;
        }
    }
}

void gemm_bf16(const bf16 *x, const bf16 *packed, const bf16 *bias, bf16 *y, float *y_f32, int64_t M, int64_t N,
               int64_t K, int silu_mul, int num_threads) {
    const int64_t items = (N + GROUP_COLS - 1) / GROUP_COLS * ((M + BLOCK_ROWS - 1) / BLOCK_ROWS);
    int threads = num_threads < 1 ? 1 : num_threads;
    if (threads > items) threads = (int)items;
#pragma omp parallel num_threads(threads)
    gemm_bf16_team(x, packed, bias, y, y_f32, M, N, K, silu_mul);
}


/* LoRA updates for runs of rows, each run with its own adapter slot (modeling/lora.py), in two phases:
 *   t[r, 0:W] = bf16(scale * x[r] @ A_s^T)      A_s: slot s's stacked lora_A factors [W, K] in 16-column
 *                                               groups, [W/16][K/2][16][2] (native_kernels.pack_lora_a)
 *   y[r] = bf16(y[r] + t[r] @ B_s^T)            B_s: its lora_B factors [N, W], packed as a weight
 * runs: num_runs x (first row, end row, slot); scales: each run's scaling. Every run reads only its own
 * slot's factors (Punica's segmented SGMV), so a step of many adapters reads each adapter's bytes once. */
static inline __attribute__((always_inline)) void lora_block(int rows, const bf16 *x, int64_t K, const bf16 *w,
                                                             bf16 *y, int64_t ldy, int64_t ncols, float scale,
                                                             int expand) {
#define LORA_BLOCK(R)                                                                    \
    if (expand)                                                                         \
        block(R, x, K, w, NULL, y, NULL, ldy, ncols, 0, NULL, 1.0f, 1, 4);              \
    else                                                                                \
        block(R, x, K, w, NULL, y, NULL, ldy, ncols, 0, NULL, scale, 0, 1);
    switch (rows) {
    case 6: LORA_BLOCK(6) break;
    case 5: LORA_BLOCK(5) break;
    case 4: LORA_BLOCK(4) break;
    case 3: LORA_BLOCK(3) break;
    case 2: LORA_BLOCK(2) break;
    default: LORA_BLOCK(1) break;
    }
#undef LORA_BLOCK
}

void lora_bf16_team(const bf16 *x, bf16 *y, bf16 *t, const int64_t *runs, const float *scales, int64_t num_runs,
                    const bf16 *a_packed, const bf16 *b_packed, int64_t N, int64_t K, int64_t W) {
    const int64_t a_groups = W / 16, b_groups = (N + GROUP_COLS - 1) / GROUP_COLS;
    const int64_t a_slot = W * K, b_slot = b_groups * GROUP_COLS * W; /* packed sizes */
    int64_t blocks = 0; /* row blocks over all runs */
    for (int64_t i = 0; i < num_runs; i++) blocks += (runs[3 * i + 1] - runs[3 * i] + BLOCK_ROWS - 1) / BLOCK_ROWS;
    for (int phase = 0; phase < 2; phase++) {
        const int64_t groups = phase == 0 ? a_groups : b_groups;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < groups * blocks; item++) {
            /* Row block major: a thread walks one slot's factors from start to end, as the prefetcher likes. */
            const int64_t g = item % groups;
            int64_t b = item / groups, run = 0, m0 = 0;
            for (;; run++) { /* the run holding row block b, and the block's first row */
                const int64_t n = (runs[3 * run + 1] - runs[3 * run] + BLOCK_ROWS - 1) / BLOCK_ROWS;
                if (b < n) {
                    m0 = runs[3 * run] + b * BLOCK_ROWS;
                    break;
                }
                b -= n;
            }
            const int64_t end = runs[3 * run + 1], slot = runs[3 * run + 2];
            const int rows = (int)(end - m0 < BLOCK_ROWS ? end - m0 : BLOCK_ROWS);
            if (phase == 0)
                lora_block(rows, x + m0 * K, K, a_packed + slot * a_slot + g * K * 16, t + m0 * W + g * 16, W, 16,
                           scales[run], 0);
            else
                lora_block(rows, t + m0 * W, W, b_packed + slot * b_slot + g * W * GROUP_COLS,
                           y + m0 * N + g * GROUP_COLS, N, N - g * GROUP_COLS < GROUP_COLS ? N - g * GROUP_COLS : GROUP_COLS,
                           1.0f, 1);
        }
    }
}

void lora_bf16(const bf16 *x, bf16 *y, bf16 *t, const int64_t *runs, const float *scales, int64_t num_runs,
               const bf16 *a_packed, const bf16 *b_packed, int64_t N, int64_t K, int64_t W, int num_threads) {
#pragma omp parallel num_threads(num_threads < 1 ? 1 : num_threads)
    lora_bf16_team(x, y, t, runs, scales, num_runs, a_packed, b_packed, N, K, W);
}

#else /* no AVX-512 BF16 on the machine that built this: native_kernels keeps oneDNN */

int lmserve_has_avx512_bf16(void) { return 0; }

void gemm_bf16_team(const bf16 *x, const bf16 *packed, const bf16 *bias, bf16 *y, float *y_f32, int64_t M,
                    int64_t N, int64_t K, int silu_mul) {
    (void)x, (void)packed, (void)bias, (void)y, (void)y_f32, (void)M, (void)N, (void)K, (void)silu_mul;
}

void gemm_bf16(const bf16 *x, const bf16 *packed, const bf16 *bias, bf16 *y, float *y_f32, int64_t M, int64_t N,
               int64_t K, int silu_mul, int num_threads) {
    (void)x, (void)packed, (void)bias, (void)y, (void)y_f32, (void)M, (void)N, (void)K, (void)silu_mul, (void)num_threads;
}

void lora_bf16_team(const bf16 *x, bf16 *y, bf16 *t, const int64_t *runs, const float *scales, int64_t num_runs,
                    const bf16 *a_packed, const bf16 *b_packed, int64_t N, int64_t K, int64_t W) {
    (void)x, (void)y, (void)t, (void)runs, (void)scales, (void)num_runs, (void)a_packed, (void)b_packed, (void)N,
        (void)K, (void)W;
}

void lora_bf16(const bf16 *x, bf16 *y, bf16 *t, const int64_t *runs, const float *scales, int64_t num_runs,
               const bf16 *a_packed, const bf16 *b_packed, int64_t N, int64_t K, int64_t W, int num_threads) {
    (void)x, (void)y, (void)t, (void)runs, (void)scales, (void)num_runs, (void)a_packed, (void)b_packed, (void)N,
        (void)K, (void)W, (void)num_threads;
}

#endif
