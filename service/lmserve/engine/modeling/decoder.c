/* Every decoder layer of one step in a single OpenMP parallel region: bf16 on CPUs where gemm.c runs, and
 * float32 with quantized weights (--quantization) on any CPU (decoder_stack_f32q, at the end).
 *
 *   decoder_stack_bf16   residual[T, H] := the decoder layers applied to it (before the final norm)
 *
 * The same kernels, in the same order and with the same split of work over threads, as the per-op path of
 * llama.py (_forward_fused), so the result is bit for bit the same. What it saves is everything between
 * them: per layer that path makes nine calls from Python, each with its argument checks, a torch
 * allocation and a fork and join of the OpenMP team, while the other core waits. Here the phases are
 * separated by barriers only.
 *
 * layers: [L][LMSERVE_LAYER_SLOTS] addresses (0: none), in abi.h's lmserve_layer_slot order, of each layer's
 * qkv, o, gate_up and down weights packed by native_kernels.pack_weight (weight_kind LMSERVE_WEIGHT_BF16) or
 * as int8 by qgemm_vnni.py's pack_vnni (LMSERVE_WEIGHT_INT8, their scales in the _S slots: `--quantization
 * int8` under bf16 activations, where the CPU has AVX-512 VNNI), their biases, and the input and
 * post-attention norms' weights (native_kernels.layer_table). silu_gate_up:
 * the gate/up weights are packed so that gemm.c or qgemm_vnni.c applies SiLU-and-multiply as it writes
 * (pack_weight's or pack_vnni's silu_mul); otherwise silu_mul runs as a phase of its own.
 * kv_cache: [L, 2, num_kv_heads, num_blocks, block_size, head_dim]. cos, sin: [T, head_dim].
 * slots: [T] cache slot of each row's K/V. The attention plan (block_table, seq_of_query, ctx_lens, q_rows)
 * is native_kernels.paged_attention_kernel's.
 * Returns 0, 1 when scratch memory could not be had, or 2 for a weight kind this build cannot run (nothing
 * computed then).
 */
#include <stdint.h>
#include <stdlib.h>

#include "abi.h"
#include "bf16.h"
#include "kernels.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)

#define PTR(layer, i) ((const bf16 *)(intptr_t)(layer)[i])

#if defined(__AVX512VNNI__)
#define HAS_VNNI 1
#else
#define HAS_VNNI 0
#endif

/* y = x . W^T (+ bias) for the projection in slots (w, s, b) of a layer row: gemm.c's bf16 weights, or
 * qgemm_vnni.c's int8 ones (scales in slot s), whose rows of x are quantized into the shared xq, sx, cx. */
static inline void linear_team(const int64_t *layer, int w, int s, int b, int kind, const bf16 *x, bf16 *y, int64_t M,
                               int64_t N, int64_t K, int silu, int8_t *xq, float *sx, int32_t *cx) {
    if (kind == LMSERVE_WEIGHT_INT8)
        qgemm_vnni_team(x, xq, sx, cx, (const uint8_t *)(intptr_t)layer[w], (const float *)(intptr_t)layer[s],
                        PTR(layer, b), y, NULL, M, N, K, silu);
    else
        gemm_bf16_team(x, PTR(layer, w), PTR(layer, b), y, NULL, M, N, K, silu);
}

/* Layer l's LoRA updates on projection p (0 qkv, 1 o, 2 gate/up, 3 down; lora: [layers][4] x (A, B, width),
 * width 0 for none), added to the projection's output y of input x (gemm.c's lora_bf16_team). */
#define LORA(p, x_in, y_out, N, K)                                                                              \
    do {                                                                                                       \
        const int64_t *e = lora == NULL ? NULL : lora + 3 * (l * LMSERVE_LORA_PROJECTIONS + (p));              \
        if (e != NULL && e[2] != 0)                                                                            \
            lora_bf16_team(x_in, y_out, lora_t, lora_runs, lora_scales, lora_num_runs, PTR(e, 0), PTR(e, 1), N, \
                           K, e[2]);                                                                           \
    } while (0)

int decoder_stack_bf16(bf16 *residual, const int64_t *layers, int64_t num_layers, const bf16 *cos, const bf16 *sin,
                       const int64_t *slots, bf16 *kv_cache, int64_t num_blocks, int64_t block_size,
                       const int64_t *block_table, const int64_t *seq_of_query, const int64_t *ctx_lens,
                       const int64_t *q_rows, int64_t num_queries, int64_t max_blocks, int64_t max_ctx, int64_t T,
                       int64_t hidden, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t inter,
                       int weight_kind, int silu_gate_up, float eps, float scale, const int64_t *lora,
                       const int64_t *lora_runs, const float *lora_scales, int64_t lora_num_runs, int num_threads) {
    if (weight_kind != LMSERVE_WEIGHT_BF16 && !(weight_kind == LMSERVE_WEIGHT_INT8 && HAS_VNNI)) return 2;
    const int quantized = weight_kind == LMSERVE_WEIGHT_INT8;
    const int64_t q_width = num_heads * head_dim, kv_width = num_kv_heads * head_dim;
    const int64_t qkv_width = q_width + 2 * kv_width;
    const int64_t plane = num_kv_heads * num_blocks * block_size * head_dim; /* one layer's K (or V) */
    const int64_t group = num_heads / num_kv_heads;
    int64_t k_max = hidden > inter ? hidden : inter;
    k_max = (k_max > q_width ? k_max : q_width) + LMSERVE_QGEMM_K_ALIGN; /* room for K rounded up to 32 */
    const int64_t k_blocks = quantized ? k_max / LMSERVE_QGEMM_K_ALIGN : 0;
    int64_t lora_width = 0; /* the widest LoRA slot block: its rows' shrunk activations go in lora_t */
    for (int64_t i = 0; lora != NULL && i < num_layers * LMSERVE_LORA_PROJECTIONS; i++)
        lora_width = lora[3 * i + 2] > lora_width ? lora[3 * i + 2] : lora_width;
    /* Activations, reused by every layer: x (normed input), qkv, q, k, attention output, projection
     * output (o, then the MLP's), gate_up (only where silu_mul is a phase of its own), and the MLP's
     * activation; for int8 weights the quantized rows' scales sx and corrections cx (4 bytes each, counted
     * as two bf16), then the quantized rows xq (bytes, last). */
    const int64_t sizes[] = {T * hidden, T * qkv_width, T * q_width, T * kv_width, T * q_width, T * hidden,
                             silu_gate_up ? 0 : T * 2 * inter, T * inter, T * lora_width, 2 * T * k_blocks,
                             2 * T * k_blocks};
    int64_t total = 0;
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) total += sizes[i];
    bf16 *buf = malloc(sizeof(bf16) * (size_t)total + (size_t)(quantized ? T * k_max : 0));
    if (buf == NULL) return 1;
    bf16 *x = buf, *qkv = x + sizes[0], *q = qkv + sizes[1], *k = q + sizes[2], *attn = k + sizes[3];
    bf16 *proj = attn + sizes[4], *gate_up = proj + sizes[5], *act = gate_up + sizes[6], *lora_t = act + sizes[7];
    float *sx = (float *)(lora_t + sizes[8]);
    int32_t *cx = (int32_t *)(sx + T * k_blocks);
    int8_t *xq = (int8_t *)(cx + T * k_blocks);
    const int kind = weight_kind;
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        float *sg = team_scratch(sizeof(float) * (size_t)(group * (max_ctx + 1)), &failed); /* attention's */
        if (sg != NULL) { /* every thread or none runs the layers: each phase below is a worksharing loop */
            add_rms_norm_team(NULL, residual, PTR(layers, LMSERVE_INPUT_NORM), x, T, hidden, eps);
            for (int64_t l = 0; l < num_layers; l++) {
                const int64_t *w = layers + l * LMSERVE_LAYER_SLOTS;
                bf16 *k_plane = kv_cache + l * 2 * plane, *v_plane = k_plane + plane;
                linear_team(w, LMSERVE_QKV_W, LMSERVE_QKV_S, LMSERVE_QKV_B, kind, x, qkv, T, qkv_width, hidden, 0, xq,
                            sx, cx);
                LORA(0, x, qkv, qkv_width, hidden);
                rope_cache_team(qkv, cos, sin, q, k, k_plane, v_plane, slots, T, num_heads, num_kv_heads, head_dim,
                                num_blocks * block_size);
                attention_bf16_team(q, k_plane, v_plane, attn, block_table, seq_of_query, ctx_lens, q_rows,
                                    num_queries, num_heads, num_kv_heads, head_dim, num_blocks, block_size, max_blocks,
                                    max_ctx, scale, sg);
                linear_team(w, LMSERVE_O_W, LMSERVE_O_S, LMSERVE_O_B, kind, attn, proj, T, hidden, q_width, 0, xq, sx, cx);
                LORA(1, attn, proj, hidden, q_width);
                add_rms_norm_team(proj, residual, PTR(w, LMSERVE_POST_NORM), x, T, hidden, eps);
                if (silu_gate_up) {
                    linear_team(w, LMSERVE_GATE_UP_W, LMSERVE_GATE_UP_S, LMSERVE_GATE_UP_B, kind, x, act, T, 2 * inter,
                                hidden, 1, xq, sx, cx);
                } else {
                    linear_team(w, LMSERVE_GATE_UP_W, LMSERVE_GATE_UP_S, LMSERVE_GATE_UP_B, kind, x, gate_up, T,
                                2 * inter, hidden, 0, xq, sx, cx);
                    LORA(2, x, gate_up, 2 * inter, hidden);
                    silu_mul_team(gate_up, act, T, inter);
                }
                linear_team(w, LMSERVE_DOWN_W, LMSERVE_DOWN_S, LMSERVE_DOWN_B, kind, act, proj, T, hidden, inter, 0, xq,
                            sx, cx);
                LORA(3, act, proj, hidden, inter);
                if (l + 1 < num_layers)
                    add_rms_norm_team(proj, residual, PTR(w + LMSERVE_LAYER_SLOTS, LMSERVE_INPUT_NORM), x, T, hidden, eps);
                else
                    add_rows_team(proj, residual, T, hidden);
            }
        }
        free(sg);
    }
    free(buf);
    return failed;
}

#else /* no AVX-512 BF16 on the machine that built this: gemm.c does not run, and neither does this */

int decoder_stack_bf16(bf16 *residual, const int64_t *layers, int64_t num_layers, const bf16 *cos, const bf16 *sin,
                       const int64_t *slots, bf16 *kv_cache, int64_t num_blocks, int64_t block_size,
                       const int64_t *block_table, const int64_t *seq_of_query, const int64_t *ctx_lens,
                       const int64_t *q_rows, int64_t num_queries, int64_t max_blocks, int64_t max_ctx, int64_t T,
                       int64_t hidden, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t inter,
                       int weight_kind, int silu_gate_up, float eps, float scale, const int64_t *lora,
                       const int64_t *lora_runs, const float *lora_scales, int64_t lora_num_runs, int num_threads) {
    (void)lora, (void)lora_runs, (void)lora_scales, (void)lora_num_runs;
    (void)weight_kind, (void)residual, (void)layers, (void)num_layers, (void)cos, (void)sin, (void)slots, (void)kv_cache;
    (void)num_blocks, (void)block_size, (void)block_table, (void)seq_of_query, (void)ctx_lens, (void)q_rows;
    (void)num_queries, (void)max_blocks, (void)max_ctx, (void)T, (void)hidden, (void)num_heads, (void)num_kv_heads;
    (void)head_dim, (void)inter, (void)silu_gate_up, (void)eps, (void)scale, (void)num_threads;
    return 2; /* nothing computed; native_kernels never calls it here (gemm_bf16_available is false) */
}

#endif

/* decoder_stack_f32q: the same for a float32 step whose projections are quantized (--quantization int8,
 * q4_1 or q8_0), on any CPU the kernels build for: every layer in one parallel region, with the kernels of
 * the per-op path (llama.py's _layers_fused with those weights) in its order, so the result is bit for bit
 * that path's. The projections are qgemm.c's (int8, with the _S slots' scales) or qgemm_gguf.c's (a GGUF's
 * blocks), each quantizing its rows of x into the one scratch shared by all of them; SiLU-and-multiply is a
 * phase of its own; the KV cache is bf16 (kv_cache: [L, 2, num_kv_heads, num_blocks, block_size, head_dim]
 * bf16), written by rope_cache_f32_team and read by attention_f32_bf16kv_team. */

#define FPTR(layer, i) ((const float *)(intptr_t)(layer)[i])

/* y = x . W^T (+ bias) for the projection in slots (w, s, b) of a layer row. */
static void qlinear_team(const int64_t *layer, int w, int s, int b, int kind, const float *x, float *y, int64_t M,
                         int64_t N, int64_t K, int8_t *qx, float *dx, float *sx) {
    if (kind == LMSERVE_WEIGHT_INT8)
        qgemm_int8_team(x, qx, sx, (const int8_t *)(intptr_t)layer[w], FPTR(layer, s), FPTR(layer, b), y, M, N, K);
    else
        gguf_gemm_team(x, (const uint8_t *)(intptr_t)layer[w], FPTR(layer, b), y, M, N, K, kind, qx, dx, sx);
}

int decoder_stack_f32q(float *residual, const int64_t *layers, int64_t num_layers, const float *cos, const float *sin,
                       const int64_t *slots, bf16 *kv_cache, int64_t num_blocks, int64_t block_size,
                       const int64_t *block_table, const int64_t *seq_of_query, const int64_t *ctx_lens,
                       const int64_t *q_rows, int64_t num_queries, int64_t max_blocks, int64_t max_ctx, int64_t T,
                       int64_t hidden, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t inter,
                       int weight_kind, float eps, float scale, int num_threads) {
    if (weight_kind != LMSERVE_WEIGHT_INT8 && weight_kind != LMSERVE_GGUF_Q4_1 && weight_kind != LMSERVE_GGUF_Q8_0)
        return 2;
    if ((weight_kind != LMSERVE_WEIGHT_INT8) && (hidden % LMSERVE_GGUF_BLOCK || inter % LMSERVE_GGUF_BLOCK ||
                                                 (num_heads * head_dim) % LMSERVE_GGUF_BLOCK))
        return 2;
    const int64_t q_width = num_heads * head_dim, kv_width = num_kv_heads * head_dim;
    const int64_t qkv_width = q_width + 2 * kv_width;
    const int64_t plane = num_kv_heads * num_blocks * block_size * head_dim; /* one layer's K (or V) */
    const int64_t group = num_heads / num_kv_heads;
    int64_t k_max = hidden > inter ? hidden : inter;
    k_max = (k_max > q_width ? k_max : q_width) + LMSERVE_GGUF_BLOCK; /* room for K rounded up to 32 */
    const int64_t q_rows_pad = quant_rows(T), k_blocks = k_max / LMSERVE_GGUF_BLOCK;
    /* Activations, as decoder_stack_bf16's (gate_up always: silu_mul is a phase here), then the quantized
     * rows' scales dx, sx (floats) and the quantized rows qx (bytes, last). */
    const int64_t sizes[] = {T * hidden, T * qkv_width, T * q_width, T * kv_width, T * q_width, T * hidden,
                             T * 2 * inter, T * inter, q_rows_pad * k_blocks, q_rows_pad * k_blocks};
    int64_t total = 0;
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) total += sizes[i];
    float *buf = malloc(sizeof(float) * (size_t)total + (size_t)(q_rows_pad * k_max));
    if (buf == NULL) return 1;
    float *x = buf, *qkv = x + sizes[0], *q = qkv + sizes[1], *k = q + sizes[2], *attn = k + sizes[3];
    float *proj = attn + sizes[4], *gate_up = proj + sizes[5], *act = gate_up + sizes[6];
    float *dx = act + sizes[7], *sx = dx + sizes[8];
    int8_t *qx = (int8_t *)(sx + sizes[9]);
    const int kind = weight_kind;
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        float *sg = team_scratch(sizeof(float) * attention_scratch_floats(group, head_dim, max_ctx), &failed);
        if (sg != NULL) { /* every thread or none runs the layers: each phase below is a worksharing loop */
            add_rms_norm_f32_team(NULL, residual, FPTR(layers, LMSERVE_INPUT_NORM), x, T, hidden, eps);
            for (int64_t l = 0; l < num_layers; l++) {
                const int64_t *w = layers + l * LMSERVE_LAYER_SLOTS;
                bf16 *k_plane = kv_cache + l * 2 * plane, *v_plane = k_plane + plane;
                qlinear_team(w, LMSERVE_QKV_W, LMSERVE_QKV_S, LMSERVE_QKV_B, kind, x, qkv, T, qkv_width, hidden, qx,
                             dx, sx);
                rope_cache_f32_team(qkv, cos, sin, q, k, k_plane, v_plane, slots, T, num_heads, num_kv_heads, head_dim,
                                    num_blocks * block_size);
                attention_f32_bf16kv_team(q, k_plane, v_plane, attn, block_table, seq_of_query, ctx_lens, q_rows,
                                          num_queries, num_heads, num_kv_heads, head_dim, num_blocks, block_size,
                                          max_blocks, max_ctx, scale, sg);
                qlinear_team(w, LMSERVE_O_W, LMSERVE_O_S, LMSERVE_O_B, kind, attn, proj, T, hidden, q_width, qx, dx, sx);
                add_rms_norm_f32_team(proj, residual, FPTR(w, LMSERVE_POST_NORM), x, T, hidden, eps);
                qlinear_team(w, LMSERVE_GATE_UP_W, LMSERVE_GATE_UP_S, LMSERVE_GATE_UP_B, kind, x, gate_up, T, 2 * inter,
                             hidden, qx, dx, sx);
                silu_mul_f32_team(gate_up, act, T, inter);
                qlinear_team(w, LMSERVE_DOWN_W, LMSERVE_DOWN_S, LMSERVE_DOWN_B, kind, act, proj, T, hidden, inter, qx,
                             dx, sx);
                if (l + 1 < num_layers)
                    add_rms_norm_f32_team(proj, residual, FPTR(w + LMSERVE_LAYER_SLOTS, LMSERVE_INPUT_NORM), x, T,
                                          hidden, eps);
                else
                    add_rows_f32_team(proj, residual, T, hidden);
            }
        }
        free(sg);
    }
    free(buf);
    return failed;
}
