/* GGUF's own 4- and 8-bit blocks as weights, for `--quantization q4_1 | q8_0` (float32 activations on CPU):
 *
 *   gguf_gemm  y[M, N] = x[M, K] . W^T, float32 in and out, W's rows as a GGUF file stores them
 *
 * W is N rows of K / 32 blocks each, exactly the bytes of the GGUF tensor (no repacking, no widening):
 * - Q4_1 (20 bytes): f16 d, f16 m, 16 bytes qs; w[i] = d * q[i] + m, q[i] = qs[i] & 15 for i < 16 and
 *   qs[i - 16] >> 4 for i >= 16 (ggml's order: low nibbles are elements 0..15).
 * - Q8_0 (34 bytes): f16 d, 32 int8 q; w[i] = d * q[i].
 * Each call quantizes the rows of x in blocks of 32, as ggml does for these weight types (its Q8_1 and
 * Q8_0 activations): per block dx = absmax / 127, qx = round_even(x / dx) in [-127, 127], and for Q4_1
 * also sx = dx * sum(qx), which carries the m term. A block's product is then
 *   Q4_1: d * dx * sum(q * qx) + m * sx        Q8_0: d * dx * sum(q * qx)
 * the integer sums exact in int32, the blocks summed in float (FMA); a bias, where there is one, added last.
 *
 * Why: at M = 1 (decode) a step reads every weight once, and memory sets its pace; Q4_1 is 5 bits a weight
 * (a sixth of float32's bytes), Q8_0 8.5. Work is split over the N output rows (OpenMP, static), so each
 * thread streams its rows' blocks front to back exactly once whatever M is; a weight row (at most a few
 * KiB) stays in L1 while up to ROW_TILE quantized rows of x pass over it.
 *
 * Inner products, by what the compiler was allowed (-march=native):
 * - AVX2: a block's 32 weights in one ymm as u8 (Q4_1's nibbles are unsigned already; Q8_0 takes |q| and
 *   moves q's sign onto x with vpsignb, llama.cpp's trick); vpmaddubsw u8 x s8 -> s16 pairs (at most
 *   2 * 128 * 127 < 2^15: never saturates, as qx is never -128), vpmaddwd with ones -> 8 int32.
 * - AVX-512 VNNI (with VL): vpdpbusd does both steps in one instruction on the same operands.
 * - otherwise plain C, so that the library builds everywhere (aarch64); slow.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "abi.h"
#include "kernels.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define QB LMSERVE_GGUF_BLOCK /* 32 */
#define Q4_1_BYTES 20
#define Q8_0_BYTES 34
#define ROW_TILE 4 /* rows of x per pass over a weight row (M > 1) */

#if defined(__AVX2__) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define GGUF_VNNI 1
#endif

int lmserve_gguf_isa(void) {
#if defined(GGUF_VNNI)
    return 2;
#elif defined(__AVX2__) && defined(__FMA__)
    return 1;
#else
    return 0;
#endif
}

static inline float f16_to_f32(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, sizeof h);
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        exp = 113;
        while (!(mant & 0x400u)) {
            mant <<= 1;
            exp--;
        }
        bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

/* One row of x in blocks of 32: qx [K], dx [K / 32], sx [K / 32] (dx * sum of the block's qx). The rounding is
 * qgemm.c's (quantize_row_int8: dx = absmax / 127, qx = round half to even of x / dx); then the sums. */
static void quantize_row_blocks(const float *x, int8_t *qx, float *dx, float *sx, int64_t K) {
    quantize_row_int8(x, qx, dx, K, K);
    for (int64_t b = 0; b < K / QB; b++) {
        int sum = 0;
        for (int i = 0; i < QB; i++) sum += qx[b * QB + i];
        sx[b] = dx[b] * (float)sum;
    }
}

int gguf_quantize_rows(const float *x, int8_t *qx, float *dx, float *sx, int64_t M, int64_t K, int num_threads) {
    int threads = num_threads < 1 ? 1 : num_threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (M > 1)
    for (int64_t m = 0; m < M; m++) {
        quantize_row_blocks(x + m * K, qx + m * K, dx + m * (K / QB), sx + m * (K / QB), K);
    }
    return 0;
}

#if defined(__AVX2__) && defined(__FMA__)
static inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(GGUF_VNNI)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* A Q4_1 block's 16 bytes of nibbles as its 32 weights in k order, u8: the bytes loaded into both 128-bit lanes
 * at once, the upper lane's shifted right by 4 (one variable shift), and both masked to 4 bits. */
static inline __m256i unpack_q4(const uint8_t *qs) {
    const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qs));
    return _mm256_and_si256(_mm256_srlv_epi32(both, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)), _mm256_set1_epi8(0x0f));
}

/* Q4_1 weight row . `mr` (1 or ROW_TILE, a constant after inlining) quantized rows of x starting at qx. */
static inline __attribute__((always_inline)) void row_q4_1(const uint8_t *w, const int8_t *qx, const float *dx,
                                                            const float *sx, int64_t K, int mr, float *out) {
    const int64_t nb = K / QB;
    __m256 acc[ROW_TILE];
    float macc[ROW_TILE];
    for (int r = 0; r < mr; r++) acc[r] = _mm256_setzero_ps(), macc[r] = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + b * Q4_1_BYTES;
        const float d = f16_to_f32(blk), m = f16_to_f32(blk + 2);
        const __m256i q = unpack_q4(blk + 4);
        for (int r = 0; r < mr; r++) {
            const int64_t xb = r * K + b * QB;
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(qx + xb));
            const __m256 p = _mm256_cvtepi32_ps(dot_u8s8(q, xv));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx[r * nb + b]), p, acc[r]);
            macc[r] += m * sx[r * nb + b];
        }
    }
    for (int r = 0; r < mr; r++) out[r] = hsum8(acc[r]) + macc[r];
}

static inline __attribute__((always_inline)) void row_q8_0(const uint8_t *w, const int8_t *qx, const float *dx,
                                                            int64_t K, int mr, float *out) {
    const int64_t nb = K / QB;
    __m256 acc[ROW_TILE];
    for (int r = 0; r < mr; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + b * Q8_0_BYTES;
        const float d = f16_to_f32(blk);
        const __m256i q = _mm256_loadu_si256((const __m256i *)(blk + 2));
        const __m256i qa = _mm256_sign_epi8(q, q); /* |q|; -128 stays 0x80, which as u8 is 128 */
        for (int r = 0; r < mr; r++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(qx + r * K + b * QB));
            const __m256 p = _mm256_cvtepi32_ps(dot_u8s8(qa, _mm256_sign_epi8(xv, q)));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx[r * nb + b]), p, acc[r]);
        }
    }
    for (int r = 0; r < mr; r++) out[r] = hsum8(acc[r]);
}

/* M = 1, Q4_1: WEIGHT_ROWS rows of W against the one row of x, so that each x block is loaded once for all
 * of them and their accumulations are independent chains (a single row's is one FMA chain, latency-bound):
 * about 1.4x faster on the decoder's shapes here. Not for Q8_0: measured on this Zen 3, its 34-byte blocks
 * from four rows at once ran the 49152-row head 1.9x slower than one row at a time. Needs F16C (vcvtph2ps on
 * the four rows' scales at once), which every AVX2 CPU has but a build may switch off. */
#if defined(__F16C__)
#define WEIGHT_ROWS 4
static void rows_q4_1_m1(const uint8_t *w, int64_t row_bytes, const int8_t *qx, const float *dx, const float *sx,
                         int64_t K, float *out) {
    const int64_t nb = K / QB;
    __m256 acc[WEIGHT_ROWS];
    __m256 macc = _mm256_setzero_ps(); /* odd lanes 2r + 1: row r's sum of m * sx */
    for (int r = 0; r < WEIGHT_ROWS; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const __m256i xv = _mm256_loadu_si256((const __m256i *)(qx + b * QB));
        /* the four rows' (d, m) f16 pairs converted at once: [d0 m0 d1 m1 d2 m2 d3 m3], then times
         * [dx sx dx sx ...]: each d * dx (the products one row at a time would take) and m * sx, FMA-added
         * into macc as before */
        int32_t dm[WEIGHT_ROWS];
        for (int r = 0; r < WEIGHT_ROWS; r++) memcpy(&dm[r], w + r * row_bytes + b * Q4_1_BYTES, sizeof dm[r]);
        const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)dm));
        const __m256 scales = _mm256_blend_ps(_mm256_set1_ps(dx[b]), _mm256_set1_ps(sx[b]), 0xaa);
        const __m256 d = _mm256_mul_ps(f, scales);
        macc = _mm256_fmadd_ps(f, scales, macc);
        for (int r = 0; r < WEIGHT_ROWS; r++) {
            const __m256i q = unpack_q4(w + r * row_bytes + b * Q4_1_BYTES + 4);
            const __m256 dr = _mm256_permutevar8x32_ps(d, _mm256_set1_epi32(2 * r));
            acc[r] = _mm256_fmadd_ps(dr, _mm256_cvtepi32_ps(dot_u8s8(q, xv)), acc[r]);
        }
    }
    float mo[8];
    _mm256_storeu_ps(mo, macc);
    for (int r = 0; r < WEIGHT_ROWS; r++) out[r] = hsum8(acc[r]) + mo[2 * r + 1];
}
#endif /* __F16C__ */

#else
static inline void row_q4_1(const uint8_t *w, const int8_t *qx, const float *dx, const float *sx, int64_t K, int mr,
                            float *out) {
    const int64_t nb = K / QB;
    for (int r = 0; r < mr; r++) {
        float total = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = w + b * Q4_1_BYTES;
            const int8_t *xb = qx + r * K + b * QB;
            int32_t dot = 0;
            for (int i = 0; i < QB / 2; i++) dot += (blk[4 + i] & 15) * xb[i] + (blk[4 + i] >> 4) * xb[i + QB / 2];
            total += f16_to_f32(blk) * dx[r * nb + b] * (float)dot + f16_to_f32(blk + 2) * sx[r * nb + b];
        }
        out[r] = total;
    }
}

static inline void row_q8_0(const uint8_t *w, const int8_t *qx, const float *dx, int64_t K, int mr, float *out) {
    const int64_t nb = K / QB;
    for (int r = 0; r < mr; r++) {
        float total = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = w + b * Q8_0_BYTES;
            const int8_t *xb = qx + r * K + b * QB;
            int32_t dot = 0;
            for (int i = 0; i < QB; i++) dot += (int8_t)blk[2 + i] * xb[i];
            total += f16_to_f32(blk) * dx[r * nb + b] * (float)dot;
        }
        out[r] = total;
    }
}
#endif

/* Rows [m0, m0 + mr) of y, column n. */
static inline __attribute__((always_inline)) void tile(const uint8_t *wrow, const int8_t *qx, const float *dx,
                                                        const float *sx, const float *bias, float *y, int64_t m0,
                                                        int mr, int64_t n, int64_t N, int64_t K, int type) {
    const int64_t nb = K / QB;
    float out[ROW_TILE];
    if (type == LMSERVE_GGUF_Q4_1)
        row_q4_1(wrow, qx + m0 * K, dx + m0 * nb, sx + m0 * nb, K, mr, out);
    else
        row_q8_0(wrow, qx + m0 * K, dx + m0 * nb, K, mr, out);
    for (int r = 0; r < mr; r++) y[(m0 + r) * N + n] = bias == NULL ? out[r] : out[r] + bias[n];
}

/* The work of one call inside a parallel region (kernels.h): the rows of x quantized into qx, dx, sx
 * (quant_rows(M) of them, those past M zero), then the output rows split over the threads. */
void gguf_gemm_team(const float *x, const uint8_t *w, const float *bias, float *y, int64_t M, int64_t N, int64_t K,
                    int type, int8_t *qx, float *dx, float *sx) {
    const int64_t nb = K / QB, row_bytes = nb * (type == LMSERVE_GGUF_Q4_1 ? Q4_1_BYTES : Q8_0_BYTES);
    const int64_t m_pad = M == 1 ? 1 : quant_rows(M);
#pragma omp for schedule(static)
    for (int64_t m = 0; m < m_pad; m++) {
        if (m < M) {
            quantize_row_blocks(x + m * K, qx + m * K, dx + m * nb, sx + m * nb, K);
        } else { /* a padding row of the last tile: scale 0 */
            memset(qx + m * K, 0, (size_t)K);
            memset(dx + m * nb, 0, sizeof(float) * (size_t)nb);
            memset(sx + m * nb, 0, sizeof(float) * (size_t)nb);
        }
    }
    /* the loop's closing barrier: every row is quantized before any thread reads them */
#if defined(WEIGHT_ROWS)
    if (M == 1 && type == LMSERVE_GGUF_Q4_1) {
        /* groups of WEIGHT_ROWS output rows, then the last few one by one */
        const int64_t groups = N / WEIGHT_ROWS;
#pragma omp for schedule(static)
        for (int64_t g = 0; g < groups + (N - groups * WEIGHT_ROWS); g++) {
            if (g < groups) {
                float *yg = y + g * WEIGHT_ROWS;
                rows_q4_1_m1(w + g * WEIGHT_ROWS * row_bytes, row_bytes, qx, dx, sx, K, yg);
                if (bias != NULL)
                    for (int r = 0; r < WEIGHT_ROWS; r++) yg[r] += bias[g * WEIGHT_ROWS + r];
            } else {
                const int64_t n = groups * WEIGHT_ROWS + (g - groups);
                tile(w + n * row_bytes, qx, dx, sx, bias, y, 0, 1, n, N, K, type);
            }
        }
        return;
    }
#endif
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *wrow = w + n * row_bytes;
        if (M == 1) {
            tile(wrow, qx, dx, sx, bias, y, 0, 1, n, N, K, type);
            continue;
        }
        int64_t m0 = 0;
        for (; m0 + ROW_TILE <= M; m0 += ROW_TILE) tile(wrow, qx, dx, sx, bias, y, m0, ROW_TILE, n, N, K, type);
        if (m0 < M) {
            /* the last partial tile runs on the zero padding rows; only the real ones are written */
            float out[ROW_TILE];
            if (type == LMSERVE_GGUF_Q4_1)
                row_q4_1(wrow, qx + m0 * K, dx + m0 * nb, sx + m0 * nb, K, ROW_TILE, out);
            else
                row_q8_0(wrow, qx + m0 * K, dx + m0 * nb, K, ROW_TILE, out);
            for (int64_t r = 0; r < M - m0; r++) y[(m0 + r) * N + n] = bias == NULL ? out[r] : out[r] + bias[n];
        }
    }
}

int gguf_gemm(const float *x, const uint8_t *w, const float *bias, float *y, int64_t M, int64_t N, int64_t K, int type,
              int num_threads) {
    if (K % QB != 0 || (type != LMSERVE_GGUF_Q4_1 && type != LMSERVE_GGUF_Q8_0)) return 2;
    if (M <= 0 || N <= 0) return 0;
    const int64_t rows = quant_rows(M), nb = K / QB;
    /* qx [rows, K] int8, then dx and sx [rows, nb] float */
    const size_t qx_bytes = (size_t)(rows * K + 63) / 64 * 64;
    const size_t total = (qx_bytes + 2 * sizeof(float) * (size_t)(rows * nb) + 63) / 64 * 64; /* C11: a multiple */
    char *buf = aligned_alloc(64, total);
    if (buf == NULL) return 1;
    float *dx = (float *)(buf + qx_bytes);
    int threads = num_threads < 1 ? 1 : num_threads;
#pragma omp parallel num_threads(threads)
    gguf_gemm_team(x, w, bias, y, M, N, K, type, (int8_t *)buf, dx, dx + rows * nb);
    free(buf);
    return 0;
}
