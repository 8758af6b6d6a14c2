/* Attention of query rows over the paged KV cache, read in place (no gather of blocks).
 *
 * Built at first use by native_kernels.py (gcc -O3 -march=native -fopenmp) and called through ctypes,
 * which releases the GIL for the call. One work item is (query row, KV head): its `group` query heads
 * share every key and value load. Each query row sees the keys [0, ctx_len) of its own sequence, which
 * covers decodes (ctx_len = position + 1) and causal chunks alike. Accumulation is in float32.
 *
 * Layouts (all contiguous):
 *   q, out        [num_rows, num_heads, head_dim]        (only rows listed in q_rows are read/written)
 *   k_cache/v_cache [num_kv_heads, num_blocks, block_size, head_dim]
 *   block_table   [num_seqs, max_blocks]   seq_of_query, ctx_lens, q_rows: [num_queries]
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float load_f32(const float *p, int64_t i) { return p[i]; }
static inline void store_f32(float *p, int64_t i, float x) { p[i] = x; }

static inline float load_bf16(const uint16_t *p, int64_t i) {
    uint32_t u = ((uint32_t)p[i]) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline void store_bf16(uint16_t *p, int64_t i, float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    u += 0x7FFFu + ((u >> 16) & 1u); /* round to nearest even, as torch does */
    p[i] = (uint16_t)(u >> 16);
}

#define DEFINE_KERNEL(NAME, T, LOAD, STORE)                                                              \
    int NAME(const T *q, const T *k_cache, const T *v_cache, T *out, const int64_t *block_table,          \
             const int64_t *seq_of_query, const int64_t *ctx_lens, const int64_t *q_rows,                \
             int64_t num_queries, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,              \
             int64_t num_blocks, int64_t block_size, int64_t max_blocks, int64_t max_ctx, float scale,    \
             int num_threads) {                                                                           \
        const int64_t group = num_heads / num_kv_heads;                                                   \
        const int64_t num_items = num_queries * num_kv_heads;                                             \
        int failed = 0;                                                                                   \
        _Pragma("omp parallel num_threads(num_threads)") {                                                \
            float *buf = malloc(sizeof(float) * (size_t)(group * (2 * head_dim + max_ctx)));              \
            if (buf == NULL) {                                                                            \
                _Pragma("omp atomic write") failed = 1;                                                   \
            } else {                                                                                      \
                float *qf = buf, *acc = buf + group * head_dim, *scores = acc + group * head_dim;         \
                _Pragma("omp for schedule(dynamic, 4)") for (int64_t item = 0; item < num_items; item++) { \
                    const int64_t n = item / num_kv_heads, kh = item % num_kv_heads;                      \
                    const int64_t row = q_rows[n], len = ctx_lens[n];                                     \
                    const int64_t *blocks = block_table + seq_of_query[n] * max_blocks;                   \
                    for (int64_t g = 0; g < group; g++) {                                                 \
                        const int64_t base = (row * num_heads + kh * group + g) * head_dim;               \
                        for (int64_t d = 0; d < head_dim; d++) qf[g * head_dim + d] = LOAD(q, base + d);  \
                    }                                                                                     \
                    for (int64_t j = 0; j < len; j++) {                                                   \
                        const int64_t kbase =                                                             \
                            ((kh * num_blocks + blocks[j / block_size]) * block_size + j % block_size) *  \
                            head_dim;                                                                     \
                        for (int64_t g = 0; g < group; g++) {                                             \
                            const float *qg = qf + g * head_dim;                                          \
                            float s = 0.0f;                                                               \
                            _Pragma("omp simd reduction(+ : s)") for (int64_t d = 0; d < head_dim; d++)   \
                                s += qg[d] * LOAD(k_cache, kbase + d);                                    \
                            scores[g * max_ctx + j] = s * scale;                                          \
                        }                                                                                 \
                    }                                                                                     \
                    for (int64_t g = 0; g < group; g++) {                                                 \
                        float *sg = scores + g * max_ctx, mx = -INFINITY, sum = 0.0f;                     \
                        for (int64_t j = 0; j < len; j++) mx = sg[j] > mx ? sg[j] : mx;                   \
                        for (int64_t j = 0; j < len; j++) {                                               \
                            sg[j] = expf(sg[j] - mx);                                                     \
                            sum += sg[j];                                                                 \
                        }                                                                                 \
                        for (int64_t j = 0; j < len; j++) sg[j] /= sum;                                   \
                    }                                                                                     \
                    memset(acc, 0, sizeof(float) * (size_t)(group * head_dim));                           \
                    for (int64_t j = 0; j < len; j++) {                                                   \
                        const int64_t vbase =                                                             \
                            ((kh * num_blocks + blocks[j / block_size]) * block_size + j % block_size) *  \
                            head_dim;                                                                     \
                        for (int64_t g = 0; g < group; g++) {                                             \
                            const float p = scores[g * max_ctx + j];                                      \
                            float *ag = acc + g * head_dim;                                               \
                            _Pragma("omp simd") for (int64_t d = 0; d < head_dim; d++)                    \
                                ag[d] += p * LOAD(v_cache, vbase + d);                                    \
                        }                                                                                 \
                    }                                                                                     \
                    for (int64_t g = 0; g < group; g++) {                                                 \
                        const int64_t base = (row * num_heads + kh * group + g) * head_dim;               \
                        for (int64_t d = 0; d < head_dim; d++) STORE(out, base + d, acc[g * head_dim + d]); \
                    }                                                                                     \
                }                                                                                         \
                free(buf);                                                                                \
            }                                                                                             \
        }                                                                                                 \
        return failed;                                                                                    \
    }

DEFINE_KERNEL(paged_attention_f32, float, load_f32, store_f32)
DEFINE_KERNEL(paged_attention_bf16, uint16_t, load_bf16, store_bf16)
