/* The kernels library's ABI, declared once: every function it exports to Python and the constants Python
 * shares with it. Every .c file includes this header, so the compiler checks each definition against its
 * declaration here (and -Wmissing-prototypes fails the build on an exported function declared nowhere);
 * kernel_abi.py reads this same file to give ctypes each function's argument and result types and to take
 * the constants, so there is no second copy to drift. Keep to its subset of C: one `#define LMSERVE_NAME
 * <integer>` per constant, the layer slots as one enum, and prototypes whose parameters are `int`,
 * `int64_t`, `float` or pointers (any pointer crosses as an address).
 *
 * Results: `int` functions return 0, or 1 when their scratch memory could not be had (nothing computed). */
#ifndef LMSERVE_ABI_H
#define LMSERVE_ABI_H
#include <stdint.h>

#include "bf16.h"

/* gemm.c's packed weights come in groups of this many output columns (native_kernels.pack_weight). */
#define LMSERVE_GEMM_GROUP_COLS 64

/* qgemm.c's packed int8 weights: groups of this many output columns, K padded to a multiple of the other
 * (native_kernels.quantize_weight). */
#define LMSERVE_QGEMM_GROUP_COLS 4
#define LMSERVE_QGEMM_K_ALIGN 32
/* qgemm_vnni.c's packed int8 weights (bf16 activations): groups of this many output columns, K padded to
 * LMSERVE_QGEMM_K_ALIGN (qgemm_vnni.py's pack_vnni). */
#define LMSERVE_VNNI_GROUP_COLS 32
/* qgemm_gguf.c: GGUF weight blocks of this many elements, and the two ggml types it computes with (their
 * GGMLQuantizationType values). */
#define LMSERVE_GGUF_BLOCK 32
#define LMSERVE_GGUF_Q4_1 3
#define LMSERVE_GGUF_Q8_0 8
/* decoder_stack_f32q's weight kinds: int8 (qgemm.c) or one of the two GGUF types above; decoder_stack_bf16's:
 * bf16 (gemm.c) or int8 (qgemm_vnni.c). */
#define LMSERVE_WEIGHT_INT8 1000
#define LMSERVE_WEIGHT_BF16 0
/* decoder_stack_bf16's LoRA table: per layer, the qkv, o, gate/up and down projections' entries. */
#define LMSERVE_LORA_PROJECTIONS 4

/* The decoder stacks' layer table: one row of addresses per layer, in this order (0: none). The _S slots are
 * int8 weights' per-channel scales (decoder_stack_f32q with LMSERVE_WEIGHT_INT8 only). */
enum lmserve_layer_slot {
    LMSERVE_QKV_W,
    LMSERVE_QKV_B,
    LMSERVE_O_W,
    LMSERVE_O_B,
    LMSERVE_GATE_UP_W,
    LMSERVE_GATE_UP_B,
    LMSERVE_DOWN_W,
    LMSERVE_DOWN_B,
    LMSERVE_INPUT_NORM,
    LMSERVE_POST_NORM,
    LMSERVE_QKV_S,
    LMSERVE_O_S,
    LMSERVE_GATE_UP_S,
    LMSERVE_DOWN_S,
    LMSERVE_LAYER_SLOTS
};

/* 1 when this build has the AVX-512 BF16 code paths (gemm_bf16, decoder_stack_bf16, the bf16 attention of
 * head_dim 64/128 and the vector forms of the fused ops), 0 for the portable build, whose gemm_bf16 and
 * decoder_stack_bf16 do nothing. */
int lmserve_has_avx512_bf16(void);

/* paged_attention.c: attention of query rows over the paged KV cache, read in place. */
int paged_attention_f32(const float *q, const float *k_cache, const float *v_cache, float *out,
                        const int64_t *block_table, const int64_t *seq_of_query, const int64_t *ctx_lens,
                        const int64_t *q_rows, int64_t num_queries, int64_t num_heads, int64_t num_kv_heads,
                        int64_t head_dim, int64_t num_blocks, int64_t block_size, int64_t max_blocks,
                        int64_t max_ctx, float scale, int num_threads);
int paged_attention_bf16(const bf16 *q, const bf16 *k_cache, const bf16 *v_cache, bf16 *out,
                         const int64_t *block_table, const int64_t *seq_of_query, const int64_t *ctx_lens,
                         const int64_t *q_rows, int64_t num_queries, int64_t num_heads, int64_t num_kv_heads,
                         int64_t head_dim, int64_t num_blocks, int64_t block_size, int64_t max_blocks,
                         int64_t max_ctx, float scale, int num_threads);
/* With a sliding window (window > 0: each query sees its last `window` keys) and attention-logit soft-capping
 * (softcap > 0), by the portable kernels, float32 and bf16. */
int paged_attention_windowed_f32(const float *q, const float *k_cache, const float *v_cache, float *out,
                                 const int64_t *block_table, const int64_t *seq_of_query, const int64_t *ctx_lens,
                                 const int64_t *q_rows, int64_t num_queries, int64_t num_heads, int64_t num_kv_heads,
                                 int64_t head_dim, int64_t num_blocks, int64_t block_size, int64_t max_blocks,
                                 int64_t max_ctx, float scale, int64_t window, float softcap, int num_threads);
int paged_attention_windowed_bf16(const bf16 *q, const bf16 *k_cache, const bf16 *v_cache, bf16 *out,
                                  const int64_t *block_table, const int64_t *seq_of_query, const int64_t *ctx_lens,
                                  const int64_t *q_rows, int64_t num_queries, int64_t num_heads, int64_t num_kv_heads,
                                  int64_t head_dim, int64_t num_blocks, int64_t block_size, int64_t max_blocks,
                                  int64_t max_ctx, float scale, int64_t window, float softcap, int num_threads);
/* float32 q and out over a bf16 cache: the quantized-weight path's (--quantization). */
int paged_attention_f32_bf16kv(const float *q, const bf16 *k_cache, const bf16 *v_cache, float *out,
                               const int64_t *block_table, const int64_t *seq_of_query, const int64_t *ctx_lens,
                               const int64_t *q_rows, int64_t num_queries, int64_t num_heads, int64_t num_kv_heads,
                               int64_t head_dim, int64_t num_blocks, int64_t block_size, int64_t max_blocks,
                               int64_t max_ctx, float scale, int num_threads);

/* fused_ops.c: the elementwise ops of a decoder layer, bf16 and (the quantized-weight path) float32. */
void add_rms_norm_bf16(const bf16 *x, bf16 *residual, const bf16 *weight, bf16 *out, int64_t rows,
                       int64_t dim, float eps, int num_threads);
void silu_mul_bf16(const bf16 *gate_up, bf16 *out, int64_t rows, int64_t inter, int num_threads);
void rope_cache_bf16(const bf16 *qkv, const bf16 *cos, const bf16 *sin, bf16 *q_out, bf16 *k_out,
                     bf16 *k_cache, bf16 *v_cache, const int64_t *slots, int64_t rows, int64_t num_heads,
                     int64_t num_kv_heads, int64_t head_dim, int64_t cache_slots, int num_threads);
void add_rms_norm_f32(const float *x, float *residual, const float *weight, float *out, int64_t rows, int64_t dim,
                      float eps, int num_threads);
void silu_mul_f32(const float *gate_up, float *out, int64_t rows, int64_t inter, int num_threads);
void rope_cache_f32(const float *qkv, const float *cos, const float *sin, float *q_out, float *k_out, bf16 *k_cache,
                    bf16 *v_cache, const int64_t *slots, int64_t rows, int64_t num_heads, int64_t num_kv_heads,
                    int64_t head_dim, int64_t cache_slots, int num_threads);

/* gemm.c: the bf16 projections (AVX-512 BF16 builds only). */
void gemm_bf16(const bf16 *x, const bf16 *packed, const bf16 *bias, bf16 *y, float *y_f32, int64_t M, int64_t N,
               int64_t K, int silu_mul, int num_threads);
/* gemm.c: LoRA updates added to y [M, N] for runs of rows (first, end, slot) x num_runs, each by its slot's
 * factors packed as weights (a_packed: slots x A [W, K]; b_packed: slots x B [N, W]); t: [M, W] scratch. */
void lora_bf16(const bf16 *x, bf16 *y, bf16 *t, const int64_t *runs, const float *scales, int64_t num_runs,
               const bf16 *a_packed, const bf16 *b_packed, int64_t N, int64_t K, int64_t W, int num_threads);

/* decoder.c: every decoder layer of a bf16 step in one call (AVX-512 BF16 builds only): weight_kind
 * LMSERVE_WEIGHT_BF16 (gemm.c's packed weights) or LMSERVE_WEIGHT_INT8 (qgemm_vnni.c's, with the _S slots'
 * scales; builds with AVX-512 VNNI only). Returns 2 for a kind this build cannot run. lora (NULL: none):
 * per-request LoRA updates, [num_layers][LMSERVE_LORA_PROJECTIONS] x (A, B, width) as lora_bf16 takes them
 * (width 0: none on that projection), over lora_num_runs runs of rows (gate/up then not packed for silu_mul). */
int decoder_stack_bf16(bf16 *residual, const int64_t *layers, int64_t num_layers, const bf16 *cos, const bf16 *sin,
                       const int64_t *slots, bf16 *kv_cache, int64_t num_blocks, int64_t block_size,
                       const int64_t *block_table, const int64_t *seq_of_query, const int64_t *ctx_lens,
                       const int64_t *q_rows, int64_t num_queries, int64_t max_blocks, int64_t max_ctx, int64_t T,
                       int64_t hidden, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t inter,
                       int weight_kind, int silu_gate_up, float eps, float scale, const int64_t *lora,
                       const int64_t *lora_runs, const float *lora_scales, int64_t lora_num_runs, int num_threads);
/* decoder.c: every decoder layer of a float32 step with quantized weights (--quantization) in one call, on any
 * CPU: weight_kind LMSERVE_WEIGHT_INT8, LMSERVE_GGUF_Q4_1 or LMSERVE_GGUF_Q8_0 for every projection. Returns
 * 2 for another kind. */
int decoder_stack_f32q(float *residual, const int64_t *layers, int64_t num_layers, const float *cos, const float *sin,
                       const int64_t *slots, bf16 *kv_cache, int64_t num_blocks, int64_t block_size,
                       const int64_t *block_table, const int64_t *seq_of_query, const int64_t *ctx_lens,
                       const int64_t *q_rows, int64_t num_queries, int64_t max_blocks, int64_t max_ctx, int64_t T,
                       int64_t hidden, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t inter,
                       int weight_kind, float eps, float scale, int num_threads);

/* qgemm.c: int8 weights (per-output-channel scales) times activations quantized in blocks of 32 along K,
 * float32 out. lmserve_qgemm_isa: 2 AVX-512 VNNI, 1 AVX2, 0 plain C. quantize_rows_int8: xq [M, Kp] and
 * sx [M, Kp / 32] as qgemm_int8 computes them (exported for the tests). qgemm_int8:
 * y[m, n] = sum_b (xq[m, b] . W_q[n, b]) * sx[m, b] * scales[n] (+ bias[n], where bias is not NULL). */
int lmserve_qgemm_isa(void);
int quantize_rows_int8(const float *x, int8_t *xq, float *sx, int64_t M, int64_t K, int64_t Kp, int num_threads);
int qgemm_int8(const float *x, const int8_t *packed, const float *scales, const float *bias, float *y, int64_t M,
               int64_t N, int64_t K, int num_threads);
/* qgemm_vnni.c: int8 weights (per-output-channel scales, packed +128 as u8) times bf16 activations quantized
 * in blocks of 32 along K (AVX-512 VNNI and BF16 builds only: lmserve_has_int8_bf16 says 1; elsewhere the
 * other two return 2 and compute nothing). quantize_rows_bf16: xq [M, Kp], sx and cx [M, Kp / 32] as
 * qgemm_vnni computes them (exported for the tests). qgemm_vnni: y[m, n] = bf16(sum_b (xq[m, b] . W_q[n, b]) *
 * sx[m, b] * scales[n] (+ bias[n])), into y_f32 as float32 instead where that is not NULL, or with silu_mul
 * y[M, N/2] = silu(gate) * up from a gate/up weight packed for it. */
int lmserve_has_int8_bf16(void);
int quantize_rows_bf16(const bf16 *x, int8_t *xq, float *sx, int32_t *cx, int64_t M, int64_t K, int num_threads);
int qgemm_vnni(const bf16 *x, const uint8_t *packed, const float *scales, const bf16 *bias, bf16 *y, float *y_f32,
               int64_t M, int64_t N, int64_t K, int silu_mul, int num_threads);
/* qgemm_gguf.c: y[M, N] = x[M, K] . W^T (+ bias, where not NULL), W's N rows in the GGUF blocks of `type` (LMSERVE_GGUF_Q4_1 or
 * _Q8_0) as stored, x quantized per block of 32 inside the call (ggml's Q8_1 / Q8_0); returns 2 for a K not a
 * multiple of 32 or another type. lmserve_gguf_isa: 2 AVX-512 VNNI, 1 AVX2, 0 plain C. gguf_quantize_rows:
 * that activation quantization alone, qx [M, K], dx and sx [M, K / 32] (exported for the tests). */
int lmserve_gguf_isa(void);
int gguf_quantize_rows(const float *x, int8_t *qx, float *dx, float *sx, int64_t M, int64_t K, int num_threads);
int gguf_gemm(const float *x, const uint8_t *w, const float *bias, float *y, int64_t M, int64_t N, int64_t K, int type,
              int num_threads);

/* sampling.c: one temperature draw per row of float32 logits. */
int sample_temperature_f32(const float *logits, const float *temperatures, const float *uniforms, int64_t *out,
                           int64_t rows, int64_t vocab, int num_threads);

/* token_mask.c: constrained decoding's token masks applied to float32 logits in place. */
void apply_token_bitmask_f32(float *logits, int64_t row_stride, const int32_t *mask, int64_t words,
                             const int64_t *rows, int64_t num_rows, int64_t vocab);

#endif
