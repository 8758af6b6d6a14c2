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

#include "bf16.h"
#include "kernels.h"

static inline float load_f32(const float *p, int64_t i) { return p[i]; }
static inline void store_f32(float *p, int64_t i, float x) { p[i] = x; }

static inline float load_bf16(const uint16_t *p, int64_t i) { return bf16_to_f32(p[i]); }
static inline void store_bf16(uint16_t *p, int64_t i, float x) { p[i] = f32_to_bf16(x); }

/* Row helpers, outside the kernel macro so that each loop vectorises (checked with -fopt-info-vec).
 * Defined twice: as written for the float32 kernel (its sums keep the order the exactness suite was
 * checked with), and under reassociation + FMA for the bf16 kernel, where a dot product's 16 lanes
 * then reduce as a tree instead of one by one. */
#define DEFINE_ROW_HELPERS(SUFFIX)                                                                        \
    static inline __attribute__((always_inline)) float dot_##SUFFIX(const float *a, const float *b, int64_t n) {                        \
        float s = 0.0f;                                                                                   \
        _Pragma("omp simd reduction(+ : s)") for (int64_t i = 0; i < n; i++) s += a[i] * b[i];            \
        return s;                                                                                         \
    }                                                                                                     \
    static inline __attribute__((always_inline)) void axpy_##SUFFIX(float *y, float a, const float *x, int64_t n) {                     \
        _Pragma("omp simd") for (int64_t i = 0; i < n; i++) y[i] += a * x[i];                             \
    }

static inline void row_f32(float *dst, const float *src, int64_t n) { memcpy(dst, src, sizeof(float) * (size_t)n); }

static inline void row_bf16(float *dst, const uint16_t *src, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(src[i]);
}

DEFINE_ROW_HELPERS(f32)

/* One work item is (query row, KV head). Keys and values are walked block by block (no division per key),
 * and each key/value row is converted to float32 once for all `group` query heads. */
#define DEFINE_KERNEL(NAME, T, LOAD, STORE, EXP, ROW, DOT, AXPY)                                                         \
    int NAME(const T *q, const T *k_cache, const T *v_cache, T *out, const int64_t *block_table,          \
             const int64_t *seq_of_query, const int64_t *ctx_lens, const int64_t *q_rows,                \
             int64_t num_queries, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,              \
             int64_t num_blocks, int64_t block_size, int64_t max_blocks, int64_t max_ctx, float scale,    \
             int num_threads) {                                                                           \
        const int64_t group = num_heads / num_kv_heads;                                                   \
        const int64_t num_items = num_queries * num_kv_heads;                                             \
        int failed = 0;                                                                                   \
        _Pragma("omp parallel num_threads(num_threads)") {                                                \
            float *buf = team_scratch(sizeof(float) * (size_t)(group * (2 * head_dim + max_ctx) + head_dim), \
                                      &failed);                                                           \
            if (buf != NULL) { /* every thread or none meets the worksharing loop */                      \
                float *qf = buf, *acc = buf + group * head_dim, *scores = acc + group * head_dim;         \
                float *row_f = scores + group * max_ctx;                                                  \
                _Pragma("omp for schedule(dynamic, 4)") for (int64_t item = 0; item < num_items; item++) { \
                    const int64_t n = item / num_kv_heads, kh = item % num_kv_heads;                      \
                    const int64_t row = q_rows[n], len = ctx_lens[n];                                     \
                    const int64_t *blocks = block_table + seq_of_query[n] * max_blocks;                   \
                    const int64_t used_blocks = (len + block_size - 1) / block_size;                      \
                    for (int64_t g = 0; g < group; g++) {                                                 \
                        const int64_t base = (row * num_heads + kh * group + g) * head_dim;               \
                        for (int64_t d = 0; d < head_dim; d++) qf[g * head_dim + d] = LOAD(q, base + d);  \
                    }                                                                                     \
                    for (int64_t b = 0; b < used_blocks; b++) {                                           \
                        const T *kb = k_cache + (kh * num_blocks + blocks[b]) * block_size * head_dim;    \
                        const int64_t first = b * block_size;                                             \
                        const int64_t count = len - first < block_size ? len - first : block_size;        \
                        for (int64_t o = 0; o < count; o++) {                                             \
                            ROW(row_f, kb + o * head_dim, head_dim);                                      \
                            for (int64_t g = 0; g < group; g++)                                           \
                                scores[g * max_ctx + first + o] = DOT(qf + g * head_dim, row_f, head_dim) * scale; \
                        }                                                                                 \
                    }                                                                                     \
                    for (int64_t g = 0; g < group; g++) {                                                 \
                        float *sg = scores + g * max_ctx, mx = -INFINITY, sum = 0.0f;                     \
                        for (int64_t j = 0; j < len; j++) mx = sg[j] > mx ? sg[j] : mx;                   \
                        _Pragma("omp simd") for (int64_t j = 0; j < len; j++) sg[j] = EXP(sg[j] - mx);    \
                        for (int64_t j = 0; j < len; j++) sum += sg[j];                                   \
                        for (int64_t j = 0; j < len; j++) sg[j] /= sum;                                   \
                    }                                                                                     \
                    memset(acc, 0, sizeof(float) * (size_t)(group * head_dim));                           \
                    for (int64_t b = 0; b < used_blocks; b++) {                                           \
                        const T *vb = v_cache + (kh * num_blocks + blocks[b]) * block_size * head_dim;    \
                        const int64_t first = b * block_size;                                             \
                        const int64_t count = len - first < block_size ? len - first : block_size;        \
                        for (int64_t o = 0; o < count; o++) {                                             \
                            ROW(row_f, vb + o * head_dim, head_dim);                                      \
                            for (int64_t g = 0; g < group; g++)                                           \
                                AXPY(acc + g * head_dim, scores[g * max_ctx + first + o], row_f, head_dim); \
                        }                                                                                 \
                    }                                                                                     \
                    for (int64_t g = 0; g < group; g++) {                                                 \
                        const int64_t base = (row * num_heads + kh * group + g) * head_dim;               \
                        for (int64_t d = 0; d < head_dim; d++) STORE(out, base + d, acc[g * head_dim + d]); \
                    }                                                                                     \
                }                                                                                         \
            }                                                                                             \
            free(buf);                                                                                    \
        }                                                                                                 \
        return failed;                                                                                    \
    }

DEFINE_KERNEL(paged_attention_f32, float, load_f32, store_f32, expf, row_f32, dot_f32, axpy_f32)

#pragma GCC push_options
#pragma GCC optimize("-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-ffp-contract=fast")
#include "fast_exp.h" /* inside the reassociating region, so that it inlines and vectorises */
DEFINE_ROW_HELPERS(fast)
DEFINE_KERNEL(paged_attention_bf16_generic, uint16_t, load_bf16, store_bf16, fast_expf, row_bf16, dot_fast, axpy_fast)

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

/* q . k for one key: P zmm of bf16 pairs each, 16 partial sums left in the lanes. */
#define DOT_LANES(P, qz, k)                                                                               \
    ({                                                                                                    \
        __m512 t_ = _mm512_dpbf16_ps(_mm512_setzero_ps(), qz[0], (__m512bh)_mm512_loadu_si512(k));        \
        for (int c_ = 1; c_ < P; c_++)                                                                    \
            t_ = _mm512_dpbf16_ps(t_, qz[c_], (__m512bh)_mm512_loadu_si512((k) + 32 * c_));               \
        t_;                                                                                               \
    })

/* out rows of NH query heads (probabilities p[h][0..len)) = sum over keys of p * v, then * inv[h]. */
#define DEFINE_PV(HD, NH)                                                                                 \
    static inline __attribute__((always_inline)) void pv_##HD##_##NH(                                    \
        const uint16_t *v_plane, const int64_t *blocks, int64_t len, int64_t block_size, const float *p,  \
        int64_t p_stride, const float *inv, uint16_t *out) {                                              \
        enum { D = HD / 16 };                                                                             \
        __m512 acc[NH][D];                                                                                \
        for (int h = 0; h < NH; h++)                                                                      \
            for (int c = 0; c < D; c++) acc[h][c] = _mm512_setzero_ps();                                  \
        for (int64_t first = 0, b = 0; first < len; first += block_size, b++) {                          \
            const uint16_t *vb = v_plane + blocks[b] * block_size * HD;                                   \
            const int64_t count = len - first < block_size ? len - first : block_size;                    \
            for (int64_t o = 0; o < count; o++) {                                                         \
                __m512 v[D];                                                                              \
                for (int c = 0; c < D; c++) v[c] = load16_bf16(vb + o * HD + c * 16, 0xffff);                         \
                for (int h = 0; h < NH; h++) {                                                            \
                    const __m512 w = _mm512_set1_ps(p[h * p_stride + first + o]);                         \
                    for (int c = 0; c < D; c++) acc[h][c] = _mm512_fmadd_ps(w, v[c], acc[h][c]);          \
                }                                                                                         \
            }                                                                                             \
        }                                                                                                 \
        for (int h = 0; h < NH; h++)                                                                      \
            for (int c = 0; c < D; c++) {                                                                 \
                const __m512 r = _mm512_mul_ps(acc[h][c], _mm512_set1_ps(inv[h]));                        \
                store16_bf16(out + h * HD + c * 16, 0xffff, r);  \
            }                                                                                             \
    }

DEFINE_PV(64, 1)
DEFINE_PV(64, 2)
DEFINE_PV(64, 3)
DEFINE_PV(64, 4)
DEFINE_PV(128, 1)
DEFINE_PV(128, 2)

#define DEFINE_BF16_HEAD(HD, SUB)                                                                         \
    static void attend_bf16_##HD(const uint16_t *q, const uint16_t *k_plane, const uint16_t *v_plane,   \
                                 uint16_t *out, const int64_t *blocks, int64_t len, int64_t block_size,  \
                                 int64_t group, float scale, float *sg, float *inv, const kv_item *next) { \
        enum { P = HD / 32 };                                                                             \
        const int chunked = block_size % 16 == 0;                                                         \
        for (int64_t g = 0; g < group; g++) {                                                             \
            float *s = sg + g * len, mx = -INFINITY;                                                      \
            __m512bh qz[P];                                                                               \
            for (int c = 0; c < P; c++) qz[c] = (__m512bh)_mm512_loadu_si512(q + g * HD + 32 * c);        \
            for (int64_t first = 0, b = 0; first < len; first += block_size, b++) {                      \
                const uint16_t *kb = k_plane + blocks[b] * block_size * HD;                               \
                const int64_t count = len - first < block_size ? len - first : block_size;                \
                if (g == 0) { /* the first head's pass: ask for this block's values, */                   \
                    prefetch_rows(v_plane + blocks[b] * block_size * HD, count * HD);                     \
                    if (next != NULL && first < next->len) { /* and the next item's block b, into L2 */   \
                        const int64_t nb = next->blocks[b] * block_size * HD;                             \
                        prefetch_rows(next->k_plane + nb, block_size * HD);                               \
                        prefetch_rows(next->v_plane + nb, block_size * HD);                               \
                    }                                                                                     \
                }                                                                                         \
                int64_t o = 0;                                                                            \
                for (; chunked && o + 16 <= count; o += 16) { /* sixteen keys, one joint reduction */     \
                    v16f t[16];                                                                           \
                    for (int k = 0; k < 16; k++) t[k] = (v16f)DOT_LANES(P, qz, kb + (o + k) * HD);        \
                    const v16f sc = hsum16x16(t) * scale;                                                 \
                    memcpy(s + first + o, &sc, sizeof sc);                                                \
                    const float m = _mm512_reduce_max_ps((__m512)sc);                                     \
                    mx = m > mx ? m : mx;                                                                 \
                }                                                                                         \
                for (; o < count; o++) {                                                                  \
                    const float score = hsum16((v16f)DOT_LANES(P, qz, kb + o * HD)) * scale;              \
                    s[first + o] = score;                                                                 \
                    mx = score > mx ? score : mx;                                                         \
                }                                                                                         \
            }                                                                                             \
            float sum = 0.0f;                                                                             \
            _Pragma("omp simd reduction(+ : sum)") for (int64_t j = 0; j < len; j++) {                    \
                s[j] = fast_expf(s[j] - mx);                                                              \
                sum += s[j];                                                                              \
            }                                                                                             \
            inv[g] = sum > 0.0f ? 1.0f / sum : 0.0f; /* len 0: zeros, as the other kernels write */       \
        }                                                                                                 \
        for (int64_t g = 0; g < group;) {                                                                 \
            const int64_t nh = group - g < SUB ? group - g : SUB;                                         \
            PV_SWITCH_##HD(nh, v_plane, blocks, len, block_size, sg + g * len, len, inv + g, out + g * HD); \
            g += nh;                                                                                      \
        }                                                                                                 \
    }

#define PV_SWITCH_64(nh, ...)                                                                             \
    switch (nh) {                                                                                         \
    case 4: pv_64_4(__VA_ARGS__); break;                                                                  \
    case 3: pv_64_3(__VA_ARGS__); break;                                                                  \
    case 2: pv_64_2(__VA_ARGS__); break;                                                                  \
    default: pv_64_1(__VA_ARGS__); break;                                                                 \
    }
#define PV_SWITCH_128(nh, ...)                                                                            \
    switch (nh) {                                                                                         \
    case 2: pv_128_2(__VA_ARGS__); break;                                                                 \
    default: pv_128_1(__VA_ARGS__); break;                                                                \
    }

DEFINE_BF16_HEAD(64, 4)
DEFINE_BF16_HEAD(128, 2)
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
