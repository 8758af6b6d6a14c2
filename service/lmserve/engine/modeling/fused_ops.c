/* Fused elementwise ops of a bf16 decoder layer on CPU (float32 forms at the end, for the quantized-weight
 * path), each one pass over its rows instead of several
 * torch kernels (a decode step runs ~25 small ops per layer; their dispatch, not their arithmetic, is
 * what costs). Each op rounds to bf16 exactly where the torch expression it replaces does, so results
 * match torch's bf16 path except for the order of a sum of squares (RMSNorm) and SiLU's exp (fast_exp.h);
 * with AVX-512 BF16, also SiLU's division (a reciprocal estimate refined by one Newton step, within an
 * ulp or two of float32 division, before the bf16 rounding). There, add_rms_norm and silu_mul are written
 * with intrinsics (vcvtneps2bf16 rounds in one instruction what the portable loops emulate in seven, and
 * the division's vdivps alone cost more than the rest of SiLU): 3-4x faster.
 *
 *   add_rms_norm_bf16   residual += x (optional), out = weight * bf16(rms_normalise(float(residual)))
 *   silu_mul_bf16       out = bf16(silu(gate)) * up, gate and up the halves of one [rows, 2 * inter]
 *   rope_cache_bf16     RoPE on the q and k heads of a fused qkv row; q and k written contiguous,
 *                       k and v written to their paged-cache slots
 *
 * Built and loaded by native_kernels.py together with paged_attention.c.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "abi.h"
#include "bf16.h"
#include "fast_exp.h"
#include "kernels.h"

/* Rows split across threads only when there is enough work to pay for waking them. */
static inline int threads_for(int64_t rows, int64_t row_elems, int num_threads) {
    int64_t per = 16384; /* elements per thread worth a fork */
    int64_t want = rows * row_elems / per;
    if (want < 1) want = 1;
    if (want > num_threads) want = num_threads;
    if (want > rows) want = rows > 0 ? rows : 1;
    return (int)want;
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
static void add_rms_norm_row(const bf16 *x, bf16 *res, const bf16 *weight, bf16 *out, int64_t dim, float eps) {
    __m512 squares = _mm512_setzero_ps();
    for (int64_t i = 0; i < dim; i += 16) {
        const __mmask16 m = mask16(dim - i);
        __m512 v = load16_bf16(res + i, m);
        if (x != NULL) {
            v = round16_bf16(_mm512_add_ps(v, load16_bf16(x + i, m)));
            store16_bf16(res + i, m, v);
        }
        squares = _mm512_fmadd_ps(v, v, squares); /* masked-off lanes load as zero */
    }
    const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)dim + eps));
    for (int64_t i = 0; i < dim; i += 16) {
        const __mmask16 m = mask16(dim - i);
        const __m512 normed = round16_bf16(_mm512_mul_ps(load16_bf16(res + i, m), inv));
        store16_bf16(out + i, m, _mm512_mul_ps(load16_bf16(weight + i, m), normed));
    }
}

static void silu_mul_row(const bf16 *g, const bf16 *u, bf16 *out, int64_t inter) {
    for (int64_t i = 0; i < inter; i += 16) {
        const __mmask16 m = mask16(inter - i);
        store16_bf16(out + i, m, silu_mul16(load16_bf16(g + i, m), load16_bf16(u + i, m)));
    }
}

#else /* portable: loops the compiler vectorises, with bf16 rounding emulated (bf16.h) */

static void add_rms_norm_row(const bf16 *x, bf16 *res, const bf16 *weight, bf16 *o, int64_t dim, float eps) {
    if (x != NULL)
        for (int64_t i = 0; i < dim; i++) res[i] = f32_to_bf16(bf16_to_f32(res[i]) + bf16_to_f32(x[i]));
    float sum = 0.0f;
    for (int64_t i = 0; i < dim; i++) {
        float v = bf16_to_f32(res[i]);
        sum += v * v;
    }
    float inv = 1.0f / sqrtf(sum / (float)dim + eps);
    for (int64_t i = 0; i < dim; i++) {
        float normed = bf16_to_f32(f32_to_bf16(bf16_to_f32(res[i]) * inv));
        o[i] = f32_to_bf16(bf16_to_f32(weight[i]) * normed);
    }
}

/* Without trapping math, fast_expf's floorf (always inlined, so compiled with these options) vectorises:
 * a rounding instruction instead of a libm call. */
#pragma GCC push_options
#pragma GCC optimize("-fno-trapping-math")

static void silu_mul_row(const bf16 *g, const bf16 *u, bf16 *o, int64_t inter) {
#pragma omp simd
    for (int64_t i = 0; i < inter; i++) {
        float gv = bf16_to_f32(g[i]);
        float s = bf16_to_f32(f32_to_bf16(gv / (1.0f + fast_expf(-gv))));
        o[i] = f32_to_bf16(s * bf16_to_f32(u[i]));
    }
}
#pragma GCC pop_options

#endif

/* RoPE on one head: dst = x * cos + rotate_half(x) * sin, rounded to bf16 after each product and after
 * the sum, as torch computes it in bf16. cos and sin hold HF's duplicated halves. The vector path gives
 * torch's bits except where a result is a float32 denormal (below 1.2e-38), which vcvtneps2bf16 flushes
 * to zero, as every bf16 store of these kernels does. */
static inline void rope_head(const bf16 *x, const bf16 *c, const bf16 *s, bf16 *dst, int64_t half) {
    int64_t j = 0;
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    for (; j + 16 <= half; j += 16) { /* sixteen of each half at once */
        const __mmask16 all = 0xffff;
        const __m512 lo = load16_bf16(x + j, all), hi = load16_bf16(x + half + j, all);
        const __m512 c_lo = load16_bf16(c + j, all), c_hi = load16_bf16(c + half + j, all);
        const __m512 s_lo = load16_bf16(s + j, all), s_hi = load16_bf16(s + half + j, all);
        const __m512 neg_hi = _mm512_xor_ps(hi, _mm512_set1_ps(-0.0f)); /* -(+0) is -0, as torch negates */
        store16_bf16(dst + j, all, _mm512_add_ps(round16_bf16(_mm512_mul_ps(lo, c_lo)), round16_bf16(_mm512_mul_ps(neg_hi, s_lo))));
        store16_bf16(dst + half + j, all, _mm512_add_ps(round16_bf16(_mm512_mul_ps(hi, c_hi)), round16_bf16(_mm512_mul_ps(lo, s_hi))));
    }
#endif
    for (; j < half; j++) { /* the rest (all of it without AVX-512 BF16), both halves */
        for (int64_t i = j; i < 2 * half; i += half) {
            float rot = i < half ? -bf16_to_f32(x[i + half]) : bf16_to_f32(x[i - half]);
            float a = bf16_to_f32(f32_to_bf16(bf16_to_f32(x[i]) * bf16_to_f32(c[i])));
            float b = bf16_to_f32(f32_to_bf16(rot * bf16_to_f32(s[i])));
            dst[i] = f32_to_bf16(a + b);
        }
    }
}

/* Each op as the share of the threads of an enclosing parallel region (an orphaned `omp for`: decoder.c
 * runs them all inside one region per step), and as a call of its own that opens a region sized to the work. */

void add_rms_norm_team(const bf16 *x, bf16 *residual, const bf16 *weight, bf16 *out, int64_t rows, int64_t dim,
                       float eps) {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++)
        add_rms_norm_row(x == NULL ? NULL : x + r * dim, residual + r * dim, weight, out + r * dim, dim, eps);
}

void add_rows_team(const bf16 *x, bf16 *residual, int64_t rows, int64_t dim) { /* residual += x, in bf16 */
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < dim; i++)
            residual[r * dim + i] = f32_to_bf16(bf16_to_f32(residual[r * dim + i]) + bf16_to_f32(x[r * dim + i]));
}

void silu_mul_team(const bf16 *gate_up, bf16 *out, int64_t rows, int64_t inter) {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) silu_mul_row(gate_up + r * 2 * inter, gate_up + r * 2 * inter + inter, out + r * inter, inter);
}

static inline void copy_row_bf16(bf16 *dst, const bf16 *src, int64_t n) { memcpy(dst, src, sizeof(bf16) * (size_t)n); }

#define ROPE_TEAM_NAME rope_cache_team
#define ROPE_T bf16
#define ROPE_HEAD rope_head
#define ROPE_CACHE_T bf16
#define ROPE_TO_CACHE copy_row_bf16
#include "rope_cache_generic.h"

void add_rms_norm_bf16(const bf16 *x, bf16 *residual, const bf16 *weight, bf16 *out, int64_t rows,
                       int64_t dim, float eps, int num_threads) {
#pragma omp parallel num_threads(threads_for(rows, dim, num_threads))
    add_rms_norm_team(x, residual, weight, out, rows, dim, eps);
}

void silu_mul_bf16(const bf16 *gate_up, bf16 *out, int64_t rows, int64_t inter, int num_threads) {
#pragma omp parallel num_threads(threads_for(rows, inter, num_threads))
    silu_mul_team(gate_up, out, rows, inter);
}

void rope_cache_bf16(const bf16 *qkv, const bf16 *cos, const bf16 *sin, bf16 *q_out, bf16 *k_out,
                     bf16 *k_cache, bf16 *v_cache, const int64_t *slots, int64_t rows, int64_t num_heads,
                     int64_t num_kv_heads, int64_t head_dim, int64_t cache_slots, int num_threads) {
    const int64_t row_width = (num_heads + 2 * num_kv_heads) * head_dim;
#pragma omp parallel num_threads(threads_for(rows, row_width, num_threads))
    rope_cache_team(qkv, cos, sin, q_out, k_out, k_cache, v_cache, slots, rows, num_heads, num_kv_heads, head_dim,
                    cache_slots);
}

/* The float32 forms, for the quantized-weight path (--quantization: float32 activations, quantized
 * weights). Plain float32 arithmetic, in the order of the torch expressions they replace (RoPE's three
 * roundings give torch's bits), except RMSNorm's sum of squares (vectorised) and 1 / sqrt, and SiLU's exp
 * (fast_expf, about 2 ulp). */
static void add_rms_norm_row_f32(const float *x, float *res, const float *weight, float *out, int64_t dim, float eps) {
    if (x != NULL)
        for (int64_t i = 0; i < dim; i++) res[i] += x[i];
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < dim; i++) sum += res[i] * res[i];
    const float inv = 1.0f / sqrtf(sum / (float)dim + eps);
    for (int64_t i = 0; i < dim; i++) out[i] = weight[i] * (res[i] * inv);
}

#pragma GCC push_options
#pragma GCC optimize("-fno-trapping-math") /* fast_expf's floorf vectorises (see silu_mul_row) */
static void silu_mul_row_f32(const float *g, const float *u, float *o, int64_t inter) {
#pragma omp simd
    for (int64_t i = 0; i < inter; i++) o[i] = g[i] / (1.0f + fast_expf(-g[i])) * u[i];
}
#pragma GCC pop_options

static inline void rope_head_f32(const float *x, const float *c, const float *s, float *dst, int64_t half) {
    for (int64_t j = 0; j < half; j++) {
        dst[j] = x[j] * c[j] + -x[j + half] * s[j];
        dst[j + half] = x[j + half] * c[j + half] + x[j] * s[j + half];
    }
}

/* The quantized path's KV cache is bf16 (paged_attention.c's attention_f32_bf16kv_team): K and V rounded to
 * nearest even as they are stored, as torch's .to(torch.bfloat16) does; q and k come back in float32. */
static inline void round_row_bf16(bf16 *dst, const float *src, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) dst[i] = f32_to_bf16(src[i]);
}

#define ROPE_TEAM_NAME rope_cache_f32_team
#define ROPE_T float
#define ROPE_HEAD rope_head_f32
#define ROPE_CACHE_T bf16
#define ROPE_TO_CACHE round_row_bf16
#include "rope_cache_generic.h"

void add_rms_norm_f32_team(const float *x, float *residual, const float *weight, float *out, int64_t rows, int64_t dim,
                           float eps) {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++)
        add_rms_norm_row_f32(x == NULL ? NULL : x + r * dim, residual + r * dim, weight, out + r * dim, dim, eps);
}

void add_rows_f32_team(const float *x, float *residual, int64_t rows, int64_t dim) {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < dim; i++) residual[r * dim + i] += x[r * dim + i];
}

void silu_mul_f32_team(const float *gate_up, float *out, int64_t rows, int64_t inter) {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++)
        silu_mul_row_f32(gate_up + r * 2 * inter, gate_up + r * 2 * inter + inter, out + r * inter, inter);
}

void add_rms_norm_f32(const float *x, float *residual, const float *weight, float *out, int64_t rows, int64_t dim,
                      float eps, int num_threads) {
#pragma omp parallel num_threads(threads_for(rows, dim, num_threads))
    add_rms_norm_f32_team(x, residual, weight, out, rows, dim, eps);
}

void silu_mul_f32(const float *gate_up, float *out, int64_t rows, int64_t inter, int num_threads) {
#pragma omp parallel num_threads(threads_for(rows, inter, num_threads))
    silu_mul_f32_team(gate_up, out, rows, inter);
}

void rope_cache_f32(const float *qkv, const float *cos, const float *sin, float *q_out, float *k_out, bf16 *k_cache,
                    bf16 *v_cache, const int64_t *slots, int64_t rows, int64_t num_heads, int64_t num_kv_heads,
                    int64_t head_dim, int64_t cache_slots, int num_threads) {
    const int64_t row_width = (num_heads + 2 * num_kv_heads) * head_dim;
#pragma omp parallel num_threads(threads_for(rows, row_width, num_threads))
    rope_cache_f32_team(qkv, cos, sin, q_out, k_out, k_cache, v_cache, slots, rows, num_heads, num_kv_heads, head_dim,
                        cache_slots);
}
