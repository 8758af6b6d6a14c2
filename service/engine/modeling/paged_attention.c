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
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "abi.h"
#include "bf16.h"
#include "kernels.h"

static inline float load_f32(const float *p, int64_t i) { return p[i]; }
static inline void store_f32(float *p, int64_t i, float x) { p[i] = x; }

static inline float load_bf16(const uint16_t *p, int64_t i) { return bf16_to_f32(p[i]); }
static inline void store_bf16(uint16_t *p, int64_t i, float x) { p[i] = f32_to_bf16(x); }

/* Row helpers, outside the kernel so that each loop vectorises (checked with -fopt-info-vec). Written
 * twice: as here for the float32 kernel (its sums keep the order the exactness suite was checked with),
 * and below, under reassociation + FMA, for the bf16 kernel, where a dot product's 16 lanes then reduce as
 * a tree instead of one by one. */
static inline __attribute__((always_inline)) float dot_f32(const float *a, const float *b, int64_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static inline __attribute__((always_inline)) void axpy_f32(float *y, float a, const float *x, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

static inline void row_f32(float *dst, const float *src, int64_t n) { memcpy(dst, src, sizeof(float) * (size_t)n); }

static inline void row_bf16(float *dst, const uint16_t *src, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(src[i]);
}

#define ATTN_NAME paged_attention_f32
#define ATTN_TEAM_NAME attention_f32_team
#define ATTN_LINKAGE
#define ATTN_T float
#define ATTN_LOAD load_f32
#define ATTN_STORE store_f32
#define ATTN_EXP expf
#define ATTN_ROW row_f32
#define ATTN_DOT dot_f32
#define ATTN_AXPY axpy_f32
#include "paged_attention_generic.h"

#pragma GCC push_options
#pragma GCC optimize("-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-ffp-contract=fast")
#include "fast_exp.h" /* inside the reassociating region, so that it inlines and vectorises */

static inline __attribute__((always_inline)) float dot_fast(const float *a, const float *b, int64_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static inline __attribute__((always_inline)) void axpy_fast(float *y, float a, const float *x, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

/* The bf16 kernel for head sizes the AVX-512 heads below do not take, and for CPUs without AVX-512 BF16
 * (declared in kernels.h). */
#define ATTN_NAME paged_attention_bf16_generic
#define ATTN_TEAM_NAME attention_bf16_generic_team
#define ATTN_LINKAGE
#define ATTN_T uint16_t
#define ATTN_LOAD load_bf16
#define ATTN_STORE store_bf16
#define ATTN_EXP fast_expf
#define ATTN_ROW row_bf16
#define ATTN_DOT dot_fast
#define ATTN_AXPY axpy_fast
#include "paged_attention_generic.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)

/* bf16 with head_dim 64 or 128, the common sizes, on CPUs with AVX-512 BF16. Scores by vdpbf16ps straight
 * from the bf16 query and keys (exact products, float32 sums: no conversion of K at all), sixteen keys
 * reduced at once; the softmax in float32; values converted once per row for up to SUB query heads
 * whose accumulators stay in registers. A sequence's keys are read from memory once, by the first query
 * head; the group's other heads find them in L1/L2. */
typedef float v16f __attribute__((vector_size(64), aligned(4)));
typedef int32_t v16i __attribute__((vector_size(64)));

static inline __attribute__((always_inline)) float hsum16(v16f v) { return _mm512_reduce_add_ps((__m512)v); }

/* Sixteen horizontal sums at once: lane k of the result is the sum of t[k]'s lanes. Four levels of
 * pairwise shuffle-and-add (15 adds in all) instead of a 16-lane reduction per vector. */
static inline __attribute__((always_inline)) v16f hsum16x16(const v16f t[16]) {
    const v16i lo1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    const v16i hi1 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
    const v16i lo2 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
    const v16i hi2 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
    const v16i lo3 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
    const v16i hi3 = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
    const v16i lo4 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    const v16i hi4 = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
    v16f u[8], v[4], w[2];
    for (int i = 0; i < 8; i++)
        u[i] = __builtin_shuffle(t[2 * i], t[2 * i + 1], lo1) + __builtin_shuffle(t[2 * i], t[2 * i + 1], hi1);
    for (int i = 0; i < 4; i++)
        v[i] = __builtin_shuffle(u[2 * i], u[2 * i + 1], lo2) + __builtin_shuffle(u[2 * i], u[2 * i + 1], hi2);
    for (int i = 0; i < 2; i++)
        w[i] = __builtin_shuffle(v[2 * i], v[2 * i + 1], lo3) + __builtin_shuffle(v[2 * i], v[2 * i + 1], hi3);
    return __builtin_shuffle(w[0], w[1], lo4) + __builtin_shuffle(w[0], w[1], hi4);
}

/* The keys and values one work item reads: a KV head's planes, its sequence's blocks, how many keys. */
typedef struct {
    const uint16_t *k_plane, *v_plane;
    const int64_t *blocks;
    int64_t len;
} kv_item;

/* Prefetch n bf16 values from p (a block's rows) into L2, a cache line at a time. */
static inline __attribute__((always_inline)) void prefetch_rows(const uint16_t *p, int64_t n) {
    for (int64_t i = 0; i < n; i += 32) _mm_prefetch((const char *)(p + i), _MM_HINT_T1);
}

/* q . k for one key: P zmm of bf16 pairs each, 16 partial sums left in the lanes. The one expression
 * macro left: written as an always_inline function it compiles to different (longer) code for the heads
 * (tools/kernel_disasm.py shows it), and the heads are the hot loop. */
#define dot_lanes(P, qz, k)                                                                               \
    ({                                                                                                    \
        __m512 t_ = _mm512_dpbf16_ps(_mm512_setzero_ps(), qz[0], (__m512bh)_mm512_loadu_si512(k));        \
        for (int c_ = 1; c_ < P; c_++)                                                                    \
            t_ = _mm512_dpbf16_ps(t_, qz[c_], (__m512bh)_mm512_loadu_si512((k) + 32 * c_));               \
        t_;                                                                                               \
    })

/* The value passes: out rows of PV_NH query heads at once (paged_attention_pv.h). */
#define PV_FN pv_64_1
#define PV_HD 64
#define PV_NH 1
#include "paged_attention_pv.h"
#define PV_FN pv_64_2
#define PV_HD 64
#define PV_NH 2
#include "paged_attention_pv.h"
#define PV_FN pv_64_3
#define PV_HD 64
#define PV_NH 3
#include "paged_attention_pv.h"
#define PV_FN pv_64_4
#define PV_HD 64
#define PV_NH 4
#include "paged_attention_pv.h"
#define PV_FN pv_128_1
#define PV_HD 128
#define PV_NH 1
#include "paged_attention_pv.h"
#define PV_FN pv_128_2
#define PV_HD 128
#define PV_NH 2
#include "paged_attention_pv.h"

/* One work item of each head size (paged_attention_head.h). */
#define HEAD_FN attend_bf16_64
#define HEAD_HD 64
#define HEAD_SUB 4
#include "paged_attention_head.h"
#define HEAD_FN attend_bf16_128
#define HEAD_HD 128
#define HEAD_SUB 2
#include "paged_attention_head.h"
#define HAVE_BF16_HEADS 1
#endif

#ifdef HAVE_BF16_HEADS
/* The bf16 decode/prefill attention (head_dim 64 or 128) as the share of the threads of an enclosing
 * parallel region (an orphaned `omp for`; decoder.c runs it inside its per-step region). `sg` is this
 * thread's scratch of group * (max_ctx + 1) floats.
 * An item's first blocks would wait on memory (a sequence's blocks lie anywhere in the pool), so while one
 * item runs, its first pass also fetches the next item's keys and values into L2, a block of each per
 * block of its own: in a decode step at 64 sequences that is 0.86-0.95x the time of the whole stack. The
 * next item is the next index, so the threads take the items in chunks of consecutive ones: about four
 * chunks per thread, 4 to 16 items each (dynamic, and no bigger, for causal prefill rows, whose cost grows
 * along the items: a 512-token prompt's 1,536 items in chunks of 192 would leave one thread idle). */
void attention_bf16_team(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache, uint16_t *out,
                         const int64_t *block_table, const int64_t *seq_of_query, const int64_t *ctx_lens,
                         const int64_t *q_rows, int64_t num_queries, int64_t num_heads, int64_t num_kv_heads,
                         int64_t head_dim, int64_t num_blocks, int64_t block_size, int64_t max_blocks,
                         int64_t max_ctx, float scale, float *sg) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t num_items = num_queries * num_kv_heads;
    const int64_t plane = num_blocks * block_size * head_dim;
    float *inv = sg + group * max_ctx;
    int64_t chunk = num_items / (4 * omp_get_num_threads()); /* the same on every thread, as OpenMP requires */
    chunk = chunk < 4 ? 4 : chunk > 16 ? 16 : chunk;
#pragma omp for schedule(dynamic, chunk)
    for (int64_t item = 0; item < num_items; item++) {
        const int64_t n = item / num_kv_heads, kh = item % num_kv_heads;
        const int64_t base = (q_rows[n] * num_heads + kh * group) * head_dim;
        const int64_t *blocks = block_table + seq_of_query[n] * max_blocks;
        kv_item next_item;
        const kv_item *next = NULL;
        if (item + 1 < num_items) {
            const int64_t n2 = (item + 1) / num_kv_heads, kh2 = (item + 1) % num_kv_heads;
            next_item = (kv_item){k_cache + kh2 * plane, v_cache + kh2 * plane,
                                  block_table + seq_of_query[n2] * max_blocks, ctx_lens[n2]};
            next = &next_item;
        }
        if (head_dim == 64)
            attend_bf16_64(q + base, k_cache + kh * plane, v_cache + kh * plane, out + base, blocks, ctx_lens[n],
                           block_size, group, scale, sg, inv, next);
        else
            attend_bf16_128(q + base, k_cache + kh * plane, v_cache + kh * plane, out + base, blocks, ctx_lens[n],
                            block_size, group, scale, sg, inv, next);
    }
}
#endif

int paged_attention_bf16(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache, uint16_t *out,
                         const int64_t *block_table, const int64_t *seq_of_query, const int64_t *ctx_lens,
                         const int64_t *q_rows, int64_t num_queries, int64_t num_heads, int64_t num_kv_heads,
                         int64_t head_dim, int64_t num_blocks, int64_t block_size, int64_t max_blocks,
                         int64_t max_ctx, float scale, int num_threads) {
#ifdef HAVE_BF16_HEADS
    if (head_dim == 64 || head_dim == 128) {
        const int64_t group = num_heads / num_kv_heads;
        int failed = 0;
#pragma omp parallel num_threads(num_threads)
        {
            float *sg = team_scratch(sizeof(float) * (size_t)(group * (max_ctx + 1)), &failed);
            if (sg != NULL) /* every thread or none meets the worksharing loop */
                attention_bf16_team(q, k_cache, v_cache, out, block_table, seq_of_query, ctx_lens, q_rows,
                                    num_queries, num_heads, num_kv_heads, head_dim, num_blocks, block_size,
                                    max_blocks, max_ctx, scale, sg);
            free(sg);
        }
        return failed;
    }
#endif
    return paged_attention_bf16_generic(q, k_cache, v_cache, out, block_table, seq_of_query, ctx_lens, q_rows,
                                        num_queries, num_heads, num_kv_heads, head_dim, num_blocks, block_size,
                                        max_blocks, max_ctx, scale, num_threads);
}
#pragma GCC pop_options
