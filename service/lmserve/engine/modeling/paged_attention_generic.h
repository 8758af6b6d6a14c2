/* Template: paged_attention.c's portable attention kernel, for any head size, included once per element
 * type (float32, and bf16 where the AVX-512 heads do not apply). A template rather than a macro so that a
 * debugger steps through these lines. The includer defines:
 *   ATTN_NAME     the function's name            ATTN_LINKAGE  its linkage (empty, or static)
 *   ATTN_TEAM_LINKAGE  optional: the team work's linkage, where it differs
 *   ATTN_TEAM_NAME  its body as team work (kernels.h)
 *   ATTN_WRAPS    optional: the team work ATTN_NAME runs inside a region of its own (ATTN_TEAM_NAME if unset)
 *   ATTN_QT       the element type of q and out  ATTN_KVT  the KV cache's (float, bf16)
 *   ATTN_LOAD, ATTN_STORE  element i of a q / out row <-> float
 *   ATTN_EXP      exp                            ATTN_ROW      a key/value row -> float32
 *   ATTN_DOT      dot product of float32 rows    ATTN_AXPY     y += a * x over float32 rows
 *   ATTN_WINDOWED optional: the function takes `window` (> 0: a query sees only its last `window` keys, as a
 *                 sliding-window layer) and `softcap` (> 0: scores -> softcap * tanh(score / softcap), before
 *                 the softmax, as Gemma 2) after `scale`
 * One work item is (query row, KV head). Keys and values are walked block by block (no division per key),
 * and each key/value row is converted to float32 once for all `group` query heads. */
#ifndef ATTN_TEAM_LINKAGE
#define ATTN_TEAM_LINKAGE ATTN_LINKAGE
#endif
#ifdef ATTN_WINDOWED
#define ATTN_WINDOW_PARAMS , int64_t window, float softcap
#define ATTN_WINDOW_ARGS , window, softcap
#define ATTN_FIRST_KEY(len) (window > 0 && (len) > window ? (len) - window : 0)
#define ATTN_CAP(s) (softcap > 0.0f ? softcap * tanhf((s) / softcap) : (s))
#else
#define ATTN_WINDOW_PARAMS
#define ATTN_WINDOW_ARGS
#define ATTN_FIRST_KEY(len) 0
#define ATTN_CAP(s) (s)
#endif

ATTN_TEAM_LINKAGE void ATTN_TEAM_NAME(const ATTN_QT *q, const ATTN_KVT *k_cache, const ATTN_KVT *v_cache, ATTN_QT *out,
                                const int64_t *block_table, const int64_t *seq_of_query, const int64_t *ctx_lens,
                                const int64_t *q_rows, int64_t num_queries, int64_t num_heads, int64_t num_kv_heads,
                                int64_t head_dim, int64_t num_blocks, int64_t block_size, int64_t max_blocks,
                                int64_t max_ctx, float scale ATTN_WINDOW_PARAMS, float *buf) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t num_items = num_queries * num_kv_heads;
    float *qf = buf, *acc = buf + group * head_dim, *scores = acc + group * head_dim;
    float *row_f = scores + group * max_ctx;
#pragma omp for schedule(dynamic, 4)
    for (int64_t item = 0; item < num_items; item++) {
        const int64_t n = item / num_kv_heads, kh = item % num_kv_heads;
        const int64_t row = q_rows[n], len = ctx_lens[n];
        const int64_t *blocks = block_table + seq_of_query[n] * max_blocks;
        const int64_t used_blocks = (len + block_size - 1) / block_size;
        const int64_t start = ATTN_FIRST_KEY(len); /* keys before it are outside the window */
        for (int64_t g = 0; g < group; g++) {
            const int64_t base = (row * num_heads + kh * group + g) * head_dim;
            for (int64_t d = 0; d < head_dim; d++) qf[g * head_dim + d] = ATTN_LOAD(q, base + d);
        }
        for (int64_t b = start / block_size; b < used_blocks; b++) {
            const ATTN_KVT *kb = k_cache + (kh * num_blocks + blocks[b]) * block_size * head_dim;
            const int64_t first = b * block_size;
            const int64_t count = len - first < block_size ? len - first : block_size;
            for (int64_t o = start > first ? start - first : 0; o < count; o++) {
                ATTN_ROW(row_f, kb + o * head_dim, head_dim);
                for (int64_t g = 0; g < group; g++)
                    scores[g * max_ctx + first + o] = ATTN_CAP(ATTN_DOT(qf + g * head_dim, row_f, head_dim) * scale);
            }
        }
        for (int64_t g = 0; g < group; g++) {
            float *sg = scores + g * max_ctx, mx = -INFINITY, sum = 0.0f;
            for (int64_t j = start; j < len; j++) mx = sg[j] > mx ? sg[j] : mx;
#pragma omp simd
            for (int64_t j = start; j < len; j++) sg[j] = ATTN_EXP(sg[j] - mx);
            for (int64_t j = start; j < len; j++) sum += sg[j];
            for (int64_t j = start; j < len; j++) sg[j] /= sum;
        }
        memset(acc, 0, sizeof(float) * (size_t)(group * head_dim));
        for (int64_t b = start / block_size; b < used_blocks; b++) {
            const ATTN_KVT *vb = v_cache + (kh * num_blocks + blocks[b]) * block_size * head_dim;
            const int64_t first = b * block_size;
            const int64_t count = len - first < block_size ? len - first : block_size;
            for (int64_t o = start > first ? start - first : 0; o < count; o++) {
                ATTN_ROW(row_f, vb + o * head_dim, head_dim);
                for (int64_t g = 0; g < group; g++)
                    ATTN_AXPY(acc + g * head_dim, scores[g * max_ctx + first + o], row_f, head_dim);
            }
        }
        for (int64_t g = 0; g < group; g++) {
            const int64_t base = (row * num_heads + kh * group + g) * head_dim;
            for (int64_t d = 0; d < head_dim; d++) ATTN_STORE(out, base + d, acc[g * head_dim + d]);
        }
    }
}

#ifndef ATTN_WRAPS
#define ATTN_WRAPS ATTN_TEAM_NAME
#endif

ATTN_LINKAGE int ATTN_NAME(const ATTN_QT *q, const ATTN_KVT *k_cache, const ATTN_KVT *v_cache, ATTN_QT *out,
                           const int64_t *block_table, const int64_t *seq_of_query, const int64_t *ctx_lens,
                           const int64_t *q_rows, int64_t num_queries, int64_t num_heads, int64_t num_kv_heads,
                           int64_t head_dim, int64_t num_blocks, int64_t block_size, int64_t max_blocks,
                           int64_t max_ctx, float scale ATTN_WINDOW_PARAMS, int num_threads) {
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        float *buf = team_scratch(sizeof(float) * attention_scratch_floats(num_heads / num_kv_heads, head_dim, max_ctx),
                                  &failed);
        if (buf != NULL) /* every thread or none meets the worksharing loop */
            ATTN_WRAPS(q, k_cache, v_cache, out, block_table, seq_of_query, ctx_lens, q_rows, num_queries,
                           num_heads, num_kv_heads, head_dim, num_blocks, block_size, max_blocks, max_ctx, scale ATTN_WINDOW_ARGS, buf);
        free(buf);
    }
    return failed;
}

#undef ATTN_NAME
#undef ATTN_TEAM_NAME
#undef ATTN_LINKAGE
#undef ATTN_TEAM_LINKAGE
#undef ATTN_WRAPS
#undef ATTN_QT
#undef ATTN_KVT
#undef ATTN_LOAD
#undef ATTN_STORE
#undef ATTN_EXP
#undef ATTN_ROW
#undef ATTN_DOT
#undef ATTN_AXPY
#undef ATTN_WINDOWED
#undef ATTN_WINDOW_PARAMS
#undef ATTN_WINDOW_ARGS
#undef ATTN_FIRST_KEY
#undef ATTN_CAP
