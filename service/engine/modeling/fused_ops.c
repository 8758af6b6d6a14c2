/* Fused elementwise ops of a bf16 decoder layer on CPU, each one pass over its rows instead of several
 * torch kernels (a decode step runs ~25 small ops per layer; their dispatch, not their arithmetic, is
 * what costs). Each op rounds to bf16 exactly where the torch expression it replaces does, so results
 * match torch's bf16 path except for the order of a sum of squares (RMSNorm) and SiLU's exp (fast_exp.h).
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

#include "bf16.h"

/* Rows split across threads only when there is enough work to pay for waking them. */
static inline int threads_for(int64_t rows, int64_t row_elems, int num_threads) {
    int64_t per = 16384; /* elements per thread worth a fork */
    int64_t want = rows * row_elems / per;
    if (want < 1) want = 1;
    if (want > num_threads) want = num_threads;
    if (want > rows) want = rows > 0 ? rows : 1;
    return (int)want;
}

void add_rms_norm_bf16(const bf16 *x, bf16 *residual, const bf16 *weight, bf16 *out, int64_t rows,
                       int64_t dim, float eps, int num_threads) {
#pragma omp parallel for num_threads(threads_for(rows, dim, num_threads)) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        bf16 *res = residual + r * dim;
        if (x != NULL) {
            const bf16 *xr = x + r * dim;
            for (int64_t i = 0; i < dim; i++) res[i] = f32_to_bf16(bf16_to_f32(res[i]) + bf16_to_f32(xr[i]));
        }
        float sum = 0.0f;
        for (int64_t i = 0; i < dim; i++) {
            float v = bf16_to_f32(res[i]);
            sum += v * v;
        }
        float inv = 1.0f / sqrtf(sum / (float)dim + eps);
        bf16 *o = out + r * dim;
        for (int64_t i = 0; i < dim; i++) {
            float normed = bf16_to_f32(f32_to_bf16(bf16_to_f32(res[i]) * inv));
            o[i] = f32_to_bf16(bf16_to_f32(weight[i]) * normed);
        }
    }
}

/* Without trapping math, fast_expf's floorf vectorises (a rounding instruction instead of a libm call). */
#pragma GCC push_options
#pragma GCC optimize("-fno-trapping-math")
#include "fast_exp.h"

void silu_mul_bf16(const bf16 *gate_up, bf16 *out, int64_t rows, int64_t inter, int num_threads) {
#pragma omp parallel for num_threads(threads_for(rows, inter, num_threads)) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const bf16 *g = gate_up + r * 2 * inter;
        const bf16 *u = g + inter;
        bf16 *o = out + r * inter;
#pragma omp simd
        for (int64_t i = 0; i < inter; i++) {
            float gv = bf16_to_f32(g[i]);
            float s = bf16_to_f32(f32_to_bf16(gv / (1.0f + fast_expf(-gv))));
            o[i] = f32_to_bf16(s * bf16_to_f32(u[i]));
        }
    }
}
#pragma GCC pop_options

/* qkv: [rows, (num_heads + 2 * num_kv_heads) * head_dim]; cos, sin: [rows, head_dim] (HF's duplicated
 * halves); q_out: [rows, num_heads, head_dim]; k_out: [rows, num_kv_heads, head_dim];
 * k_cache, v_cache: [num_kv_heads, num_blocks * block_size, head_dim]; slots: [rows].
 * Per element, as torch computes x * cos + rotate_half(x) * sin in bf16: three roundings. */
void rope_cache_bf16(const bf16 *qkv, const bf16 *cos, const bf16 *sin, bf16 *q_out, bf16 *k_out,
                     bf16 *k_cache, bf16 *v_cache, const int64_t *slots, int64_t rows, int64_t num_heads,
                     int64_t num_kv_heads, int64_t head_dim, int64_t cache_slots, int num_threads) {
    const int64_t half = head_dim / 2;
    const int64_t row_width = (num_heads + 2 * num_kv_heads) * head_dim;
#pragma omp parallel for num_threads(threads_for(rows, row_width, num_threads)) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const bf16 *src = qkv + r * row_width;
        const bf16 *c = cos + r * head_dim;
        const bf16 *s = sin + r * head_dim;
        const int64_t slot = slots[r];
        for (int64_t h = 0; h < num_heads + num_kv_heads; h++) {
            const bf16 *x = src + h * head_dim;
            bf16 *dst = h < num_heads ? q_out + (r * num_heads + h) * head_dim
                                      : k_out + (r * num_kv_heads + (h - num_heads)) * head_dim;
            for (int64_t i = 0; i < head_dim; i++) {
                float rot = i < half ? -bf16_to_f32(x[i + half]) : bf16_to_f32(x[i - half]);
                float a = bf16_to_f32(f32_to_bf16(bf16_to_f32(x[i]) * bf16_to_f32(c[i])));
                float b = bf16_to_f32(f32_to_bf16(rot * bf16_to_f32(s[i])));
                dst[i] = f32_to_bf16(a + b);
            }
            if (h >= num_heads)
                memcpy(k_cache + ((h - num_heads) * cache_slots + slot) * head_dim, dst, head_dim * sizeof(bf16));
        }
        const bf16 *v = src + (num_heads + num_kv_heads) * head_dim;
        for (int64_t h = 0; h < num_kv_heads; h++)
            memcpy(v_cache + (h * cache_slots + slot) * head_dim, v + h * head_dim, head_dim * sizeof(bf16));
    }
}
