/* Template: fused_ops.c's RoPE-and-cache-write team work, included once per element type (bf16, and float32
 * for the quantized-weight path). The includer defines:
 *   ROPE_TEAM_NAME  the function's name (declared in kernels.h)
 *   ROPE_T          the element type            ROPE_HEAD  RoPE on one head: (x, cos, sin, dst, half)
 *   ROPE_CACHE_T    the KV cache's element type ROPE_TO_CACHE  a row into the cache: (dst, src, head_dim)
 *
 * qkv: [rows, (num_heads + 2 * num_kv_heads) * head_dim]; cos, sin: [rows, head_dim] (HF's duplicated
 * halves); q_out: [rows, num_heads, head_dim]; k_out: [rows, num_kv_heads, head_dim];
 * k_cache, v_cache: [num_kv_heads, num_blocks * block_size, head_dim]; slots: [rows].
 * Per element, as torch computes x * cos + rotate_half(x) * sin in the element type: three roundings. */
void ROPE_TEAM_NAME(const ROPE_T *qkv, const ROPE_T *cos, const ROPE_T *sin, ROPE_T *q_out, ROPE_T *k_out,
                    ROPE_CACHE_T *k_cache, ROPE_CACHE_T *v_cache, const int64_t *slots, int64_t rows, int64_t num_heads,
                    int64_t num_kv_heads, int64_t head_dim, int64_t cache_slots) {
    const int64_t half = head_dim / 2;
    const int64_t row_width = (num_heads + 2 * num_kv_heads) * head_dim;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const ROPE_T *src = qkv + r * row_width;
        const ROPE_T *c = cos + r * head_dim;
        const ROPE_T *s = sin + r * head_dim;
        const int64_t slot = slots[r];
        for (int64_t h = 0; h < num_heads + num_kv_heads; h++) {
            const ROPE_T *x = src + h * head_dim;
            ROPE_T *dst = h < num_heads ? q_out + (r * num_heads + h) * head_dim
                                        : k_out + (r * num_kv_heads + (h - num_heads)) * head_dim;
            ROPE_HEAD(x, c, s, dst, half);
            if (h >= num_heads)
                ROPE_TO_CACHE(k_cache + ((h - num_heads) * cache_slots + slot) * head_dim, dst, head_dim);
        }
        const ROPE_T *v = src + (num_heads + num_kv_heads) * head_dim;
        for (int64_t h = 0; h < num_kv_heads; h++)
            ROPE_TO_CACHE(v_cache + (h * cache_slots + slot) * head_dim, v + h * head_dim, head_dim);
    }
}

#undef ROPE_TEAM_NAME
#undef ROPE_T
#undef ROPE_CACHE_T
#undef ROPE_TO_CACHE
#undef ROPE_HEAD
