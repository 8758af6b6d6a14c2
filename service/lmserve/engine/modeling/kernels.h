/* What the kernel sources share among themselves (what they export to Python is abi.h).
 * The kernels' bodies as team work: each splits its loop over the threads of a parallel region its caller
 * has already opened (an orphaned `omp for`, whose closing barrier ends the phase), so that decoder.c runs
 * a whole step's layers inside one region. The calls of their own (gemm_bf16, add_rms_norm_bf16, ...)
 * open a region and run the same body. Every thread of the region must call each of them. */
#ifndef LMSERVE_KERNELS_H
#define LMSERVE_KERNELS_H
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"

/* Inside a parallel region, on every thread: this thread's scratch buffer of `bytes`, or NULL on every
 * thread when any thread's malloc failed (*failed, shared, is then 1). Its barrier makes the threads agree,
 * so that all of them or none go on to the worksharing loops, which every thread of a team must meet.
 * Each thread frees its own buffer (free(NULL) is fine). */
static inline void *team_scratch(size_t bytes, int *failed) {
    void *buf = malloc(bytes);
    if (buf == NULL) {
#pragma omp atomic write
        *failed = 1;
    }
#pragma omp barrier
    int any_failed;
#pragma omp atomic read
    any_failed = *failed;
    if (any_failed) {
        free(buf);
        return NULL;
    }
    return buf;
}

/* gemm.c: y[M, N] = bf16(x[M, K] @ W^T (+ bias)), W packed by native_kernels.pack_weight (into y_f32 as
 * float32 instead, where that is not NULL), or with silu_mul y[M, N/2] = silu(gate) * up from a gate/up
 * weight packed interleaved. */
void gemm_bf16_team(const bf16 *x, const bf16 *packed, const bf16 *bias, bf16 *y, float *y_f32, int64_t M,
                    int64_t N, int64_t K, int silu_mul);
/* gemm.c: LoRA updates of runs of rows (lora_bf16's work), an orphaned worksharing phase pair. */
void lora_bf16_team(const bf16 *x, bf16 *y, bf16 *t, const int64_t *runs, const float *scales, int64_t num_runs,
                    const bf16 *a_packed, const bf16 *b_packed, int64_t N, int64_t K, int64_t W);

/* fused_ops.c */
void add_rms_norm_team(const bf16 *x, bf16 *residual, const bf16 *weight, bf16 *out, int64_t rows, int64_t dim,
                       float eps);
void add_rows_team(const bf16 *x, bf16 *residual, int64_t rows, int64_t dim);
void silu_mul_team(const bf16 *gate_up, bf16 *out, int64_t rows, int64_t inter);
void rope_cache_team(const bf16 *qkv, const bf16 *cos, const bf16 *sin, bf16 *q_out, bf16 *k_out, bf16 *k_cache,
                     bf16 *v_cache, const int64_t *slots, int64_t rows, int64_t num_heads, int64_t num_kv_heads,
                     int64_t head_dim, int64_t cache_slots);

/* The per-thread scratch, in floats, of the float32-query attentions' team work below (the portable one's,
 * and attention_f32_bf16kv_team's tile of eight rows). */
static inline size_t attention_scratch_floats(int64_t group, int64_t head_dim, int64_t max_ctx) {
    return (size_t)(group * (2 * head_dim + max_ctx) + 8 * head_dim);
}

/* paged_attention.c: the portable attention's body as team work, float32 and bf16; buf: this thread's
 * attention_scratch_floats. */
void attention_f32_team(const float *q, const float *k_cache, const float *v_cache, float *out,
                        const int64_t *block_table, const int64_t *seq_of_query, const int64_t *ctx_lens,
                        const int64_t *q_rows, int64_t num_queries, int64_t num_heads, int64_t num_kv_heads,
                        int64_t head_dim, int64_t num_blocks, int64_t block_size, int64_t max_blocks, int64_t max_ctx,
                        float scale, float *buf);
/* paged_attention.c: float32 queries over a bf16 KV cache (the quantized-weight path: decoder.c's
 * decoder_stack_f32q and paged_attention_f32_bf16kv); buf: this thread's attention_scratch_floats. */
void attention_f32_bf16kv_team(const float *q, const bf16 *k_cache, const bf16 *v_cache, float *out,
                               const int64_t *block_table, const int64_t *seq_of_query, const int64_t *ctx_lens,
                               const int64_t *q_rows, int64_t num_queries, int64_t num_heads, int64_t num_kv_heads,
                               int64_t head_dim, int64_t num_blocks, int64_t block_size, int64_t max_blocks,
                               int64_t max_ctx, float scale, float *buf);
void attention_bf16_generic_team(const bf16 *q, const bf16 *k_cache, const bf16 *v_cache, bf16 *out,
                                 const int64_t *block_table, const int64_t *seq_of_query, const int64_t *ctx_lens,
                                 const int64_t *q_rows, int64_t num_queries, int64_t num_heads, int64_t num_kv_heads,
                                 int64_t head_dim, int64_t num_blocks, int64_t block_size, int64_t max_blocks,
                                 int64_t max_ctx, float scale, float *buf);

/* paged_attention.c: the portable bf16 attention (any head_dim), which paged_attention_bf16 falls back to.
 * Not exported to Python; not static either, because as a static function GCC inlines it into
 * paged_attention_bf16 and that function's code changes (tools/kernel_disasm.py). */
int paged_attention_bf16_generic(const bf16 *q, const bf16 *k_cache, const bf16 *v_cache, bf16 *out,
                                 const int64_t *block_table, const int64_t *seq_of_query, const int64_t *ctx_lens,
                                 const int64_t *q_rows, int64_t num_queries, int64_t num_heads, int64_t num_kv_heads,
                                 int64_t head_dim, int64_t num_blocks, int64_t block_size, int64_t max_blocks,
                                 int64_t max_ctx, float scale, int num_threads);

/* fused_ops.c: the same ops in float32, for the quantized-weight path (float32 activations). */
void add_rms_norm_f32_team(const float *x, float *residual, const float *weight, float *out, int64_t rows, int64_t dim,
                           float eps);
void add_rows_f32_team(const float *x, float *residual, int64_t rows, int64_t dim);
void silu_mul_f32_team(const float *gate_up, float *out, int64_t rows, int64_t inter);
void rope_cache_f32_team(const float *qkv, const float *cos, const float *sin, float *q_out, float *k_out,
                         bf16 *k_cache, bf16 *v_cache, const int64_t *slots, int64_t rows, int64_t num_heads,
                         int64_t num_kv_heads, int64_t head_dim, int64_t cache_slots);

/* The quantized matrix multiplies' rows of x are quantized into scratch of quant_rows(M) rows (a multiple of
 * 4, so that qgemm_gguf.c's tiles of 4 rows may run past M on zeros) of the call's K rounded up to 32:
 * qx [quant_rows(M), Kp] int8, dx and sx [quant_rows(M), Kp / 32] float. */
static inline int64_t quant_rows(int64_t M) { return (M + 3) / 4 * 4; }

/* qgemm.c: one row of x quantized per block of 32 (sx[b] = the block's |x|max / 127, q = round_even(x / sx[b]),
 * zero past K up to Kp), vectorised where AVX2 is; qgemm_gguf.c quantizes its rows with it too. */
void quantize_row_int8(const float *x, int8_t *q, float *sx, int64_t K, int64_t Kp);

/* qgemm.c: qgemm_int8's body as team work, y = x . W^T (+ bias), x quantized into xq and sx first. */
void qgemm_int8_team(const float *x, int8_t *xq, float *sx, const int8_t *packed, const float *scales,
                     const float *bias, float *y, int64_t M, int64_t N, int64_t K);
/* qgemm_vnni.c: qgemm_vnni's body as team work, x's rows quantized into xq, sx and cx first (scratch of
 * [M, Kp], [M, Kp / 32] and [M, Kp / 32]). */
void qgemm_vnni_team(const bf16 *x, int8_t *xq, float *sx, int32_t *cx, const uint8_t *packed, const float *scales,
                     const bf16 *bias, bf16 *y, float *y_f32, int64_t M, int64_t N, int64_t K, int silu_mul);
/* qgemm_gguf.c: gguf_gemm's body as team work (K a multiple of 32, type Q4_1 or Q8_0, as gguf_gemm checks). */
void gguf_gemm_team(const float *x, const uint8_t *w, const float *bias, float *y, int64_t M, int64_t N, int64_t K,
                    int type, int8_t *qx, float *dx, float *sx);

/* paged_attention.c, with AVX-512 BF16 only (head_dim 64 or 128); sg: group * (max_ctx + 1) floats. */
void attention_bf16_team(const bf16 *q, const bf16 *k_cache, const bf16 *v_cache, bf16 *out,
                         const int64_t *block_table, const int64_t *seq_of_query, const int64_t *ctx_lens,
                         const int64_t *q_rows, int64_t num_queries, int64_t num_heads, int64_t num_kv_heads,
                         int64_t head_dim, int64_t num_blocks, int64_t block_size, int64_t max_blocks,
                         int64_t max_ctx, float scale, float *sg);

#endif
