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
#define ATTN_QT float
#define ATTN_KVT float
#define ATTN_LOAD load_f32
#define ATTN_STORE store_f32
#define ATTN_EXP expf
#define ATTN_ROW row_f32
#define ATTN_DOT dot_f32
#define ATTN_AXPY axpy_f32
#include "paged_attention_generic.h"

/* The portable kernels again with a sliding window and soft-capping (window > 0, softcap > 0), for the layers
 * of the families that have them (Mistral, Gemma 2/3, StarCoder2...): every query row is its own work item
 * over its own keys, so results do not depend on what else is in the step. float32 here; bf16 below. */
#define ATTN_WINDOWED
#define ATTN_NAME paged_attention_windowed_f32
#define ATTN_TEAM_NAME attention_windowed_f32_team
#define ATTN_LINKAGE
#define ATTN_TEAM_LINKAGE static
#define ATTN_QT float
#define ATTN_KVT float
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
#define ATTN_QT uint16_t
#define ATTN_KVT uint16_t
#define ATTN_LOAD load_bf16
#define ATTN_STORE store_bf16
#define ATTN_EXP fast_expf
#define ATTN_ROW row_bf16
#define ATTN_DOT dot_fast
#define ATTN_AXPY axpy_fast
#include "paged_attention_generic.h"

#define ATTN_WINDOWED
#define ATTN_NAME paged_attention_windowed_bf16
#define ATTN_TEAM_NAME attention_windowed_bf16_team
#define ATTN_LINKAGE
#define ATTN_TEAM_LINKAGE static
#define ATTN_QT uint16_t
#define ATTN_KVT uint16_t
#define ATTN_LOAD load_bf16
#define ATTN_STORE store_bf16
#define ATTN_EXP fast_expf
#define ATTN_ROW row_bf16
#define ATTN_DOT dot_fast
#define ATTN_AXPY axpy_fast
#include "paged_attention_generic.h"

#if defined(__AVX2__)
#include <immintrin.h>

/* Prefetch n bf16 values from p (a block's rows), a cache line at a time: into L2 (the AVX-512 BF16 heads,
 * and attend_f32_bf16kv for the next item), or into L1 (attend_f32_bf16kv's next block). */
static inline __attribute__((always_inline)) void prefetch_rows(const uint16_t *p, int64_t n) {
    for (int64_t i = 0; i < n; i += 32) _mm_prefetch((const char *)(p + i), _MM_HINT_T1);
}
static inline __attribute__((always_inline)) void prefetch_rows_l1(const uint16_t *p, int64_t n) {
    for (int64_t i = 0; i < n; i += 32) _mm_prefetch((const char *)(p + i), _MM_HINT_T0);
}
#endif

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

/* float32 queries over a bf16 KV cache: the attention of the quantized-weight path (--quantization; float32
 * activations), whose cache holds K and V in bf16, rounded to nearest even as they are written
 * (fused_ops.c's rope_cache_f32). At many sequences a decode step's attention reads every sequence's whole
 * cache, and that read is what it waits on: bf16 halves it. Exported as paged_attention_f32_bf16kv (abi.h)
 * and as team work for decoder.c's quantized stack (kernels.h); both sums reassociate and exp is fast_expf,
 * as in the bf16 kernels, so a result is within float32 rounding of paged_attention_f32 on the same
 * (bf16-valued) cache, not bit for bit.
 *
 * The portable form: the template's, for any head size and where there is no AVX2. */
#define ATTN_NAME paged_attention_f32_bf16kv
#define ATTN_TEAM_NAME attention_f32_bf16kv_generic_team
#define ATTN_WRAPS attention_f32_bf16kv_team
#define ATTN_LINKAGE
#define ATTN_TEAM_LINKAGE static
#define ATTN_QT float
#define ATTN_KVT uint16_t
#define ATTN_LOAD load_f32
#define ATTN_STORE store_f32
#define ATTN_EXP fast_expf
#define ATTN_ROW row_bf16
#define ATTN_DOT dot_fast
#define ATTN_AXPY axpy_fast
#include "paged_attention_generic.h"

#if defined(__AVX2__) && defined(__FMA__)

/* AVX2 with head_dim a multiple of 64: keys and values eight at a time, each tile of eight rows converted
 * to float32 once into scratch (L1) for all `group` query heads. Scores: a head's eight dot products
 * accumulate in eight registers along head_dim, then reduce in one transposing sum (hsum8x8). Values: a
 * head's 64-float slice of the output stays in eight registers over the tile's keys. Like
 * attention_bf16_team, an item's first pass also asks for the next item's blocks (into L2). */
#define TILE 8

static inline __attribute__((always_inline)) __m256 load8_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* Lane k of the result: the sum of t[k]'s eight lanes. */
static inline __attribute__((always_inline)) __m256 hsum8x8(const __m256 t[8]) {
    const __m256 ab = _mm256_hadd_ps(_mm256_hadd_ps(t[0], t[1]), _mm256_hadd_ps(t[2], t[3]));
    const __m256 cd = _mm256_hadd_ps(_mm256_hadd_ps(t[4], t[5]), _mm256_hadd_ps(t[6], t[7]));
    /* ab: the sums of t[0..3]'s low four lanes, then of their high four; cd: the same for t[4..7] */
    return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}

/* Rows [0, n) of a block's bf16 rows as float32 in tile (TILE rows of head_dim); rows past n zero. */
static inline void tile_rows(float *tile, const uint16_t *rows, int64_t n, int64_t head_dim) {
    for (int64_t i = 0; i < n * head_dim; i += 8) _mm256_storeu_ps(tile + i, load8_bf16(rows + i));
    for (int64_t i = n * head_dim; i < TILE * head_dim; i += 8) _mm256_storeu_ps(tile + i, _mm256_setzero_ps());
}

/* One work item: the group's query heads q[group][head_dim] over len keys; out likewise. scores: group * len
 * floats; acc: group * head_dim; tile: TILE * head_dim. */
static void attend_f32_bf16kv(const float *q, const uint16_t *k_plane, const uint16_t *v_plane, float *out,
                              const int64_t *blocks, int64_t len, int64_t block_size, int64_t group,
                              int64_t head_dim, float scale, float *scores, float *acc, float *tile,
                              const uint16_t *next_k, const uint16_t *next_v, const int64_t *next_blocks,
                              int64_t next_len) {
    const int64_t D = head_dim / 8, row = block_size * head_dim;
    for (int64_t first = 0, b = 0; first < len; first += block_size, b++) {
        const uint16_t *kb = k_plane + blocks[b] * row;
        const int64_t count = len - first < block_size ? len - first : block_size;
        prefetch_rows(v_plane + blocks[b] * row, count * head_dim);
        if (first + block_size < len) prefetch_rows_l1(k_plane + blocks[b + 1] * row, row);
        if (next_k != NULL && first < next_len) {
            prefetch_rows(next_k + next_blocks[b] * row, row);
            prefetch_rows(next_v + next_blocks[b] * row, row);
        }
        for (int64_t o = 0; o < count; o += TILE) {
            const int64_t n = count - o < TILE ? count - o : TILE;
            tile_rows(tile, kb + o * head_dim, n, head_dim);
            for (int64_t g = 0; g < group; g++) {
                const float *qg = q + g * head_dim;
                __m256 t[TILE];
                for (int k = 0; k < TILE; k++) t[k] = _mm256_setzero_ps();
                for (int64_t c = 0; c < D; c++) {
                    const __m256 qc = _mm256_loadu_ps(qg + 8 * c);
                    for (int k = 0; k < TILE; k++)
                        t[k] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(tile + k * head_dim + 8 * c), t[k]);
                }
                const __m256 s = _mm256_mul_ps(hsum8x8(t), _mm256_set1_ps(scale));
                float *dst = scores + g * len + first + o;
                if (n == TILE) {
                    _mm256_storeu_ps(dst, s);
                } else {
                    float part[TILE];
                    _mm256_storeu_ps(part, s);
                    for (int64_t k = 0; k < n; k++) dst[k] = part[k];
                }
            }
        }
    }
    for (int64_t g = 0; g < group; g++) {
        float *sg = scores + g * len, sum = 0.0f;
        __m256 m8 = _mm256_set1_ps(-INFINITY);
        int64_t j = 0;
        for (; j + 8 <= len; j += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(sg + j));
        float lanes[8], mx = -INFINITY;
        _mm256_storeu_ps(lanes, m8);
        for (int k = 0; k < 8; k++) mx = lanes[k] > mx ? lanes[k] : mx;
        for (; j < len; j++) mx = sg[j] > mx ? sg[j] : mx;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < len; j++) {
            sg[j] = fast_expf(sg[j] - mx);
            sum += sg[j];
        }
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f; /* len 0: zeros, as the other kernels write */
        for (int64_t j = 0; j < len; j++) sg[j] *= inv;
    }
    memset(acc, 0, sizeof(float) * (size_t)(group * head_dim));
    for (int64_t first = 0, b = 0; first < len; first += block_size, b++) {
        const uint16_t *vb = v_plane + blocks[b] * row;
        const int64_t count = len - first < block_size ? len - first : block_size;
        if (first + block_size < len) prefetch_rows_l1(v_plane + blocks[b + 1] * row, row);
        for (int64_t o = 0; o < count; o += TILE) {
            const int64_t n = count - o < TILE ? count - o : TILE;
            tile_rows(tile, vb + o * head_dim, n, head_dim);
            for (int64_t g = 0; g < group; g++) {
                const float *p = scores + g * len + first + o;
                for (int64_t c0 = 0; c0 < D; c0 += 8) { /* 64 floats of the head's output in registers */
                    float *a = acc + g * head_dim + 8 * c0;
                    __m256 r[8];
                    for (int c = 0; c < 8; c++) r[c] = _mm256_loadu_ps(a + 8 * c);
                    for (int64_t k = 0; k < n; k++) {
                        const __m256 w = _mm256_broadcast_ss(p + k);
                        for (int c = 0; c < 8; c++)
                            r[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(tile + k * head_dim + 8 * (c0 + c)), r[c]);
                    }
                    for (int c = 0; c < 8; c++) _mm256_storeu_ps(a + 8 * c, r[c]);
                }
            }
        }
    }
    memcpy(out, acc, sizeof(float) * (size_t)(group * head_dim));
}
#endif

/* The team work (kernels.h): the AVX2 tiles where they apply, else the portable form. buf: this thread's
 * attention_scratch_floats. Items in chunks of consecutive ones, as attention_bf16_team takes them. */
void attention_f32_bf16kv_team(const float *q, const uint16_t *k_cache, const uint16_t *v_cache, float *out,
                               const int64_t *block_table, const int64_t *seq_of_query, const int64_t *ctx_lens,
                               const int64_t *q_rows, int64_t num_queries, int64_t num_heads, int64_t num_kv_heads,
                               int64_t head_dim, int64_t num_blocks, int64_t block_size, int64_t max_blocks,
                               int64_t max_ctx, float scale, float *buf) {
#if defined(__AVX2__) && defined(__FMA__)
    if (head_dim % 64 == 0) {
        const int64_t group = num_heads / num_kv_heads;
        const int64_t num_items = num_queries * num_kv_heads;
        const int64_t plane = num_blocks * block_size * head_dim;
        float *scores = buf, *acc = scores + group * max_ctx, *tile = acc + group * head_dim;
        int64_t chunk = num_items / (4 * omp_get_num_threads()); /* the same on every thread */
        chunk = chunk < 4 ? 4 : chunk > 16 ? 16 : chunk;
#pragma omp for schedule(dynamic, chunk)
        for (int64_t item = 0; item < num_items; item++) {
            const int64_t n = item / num_kv_heads, kh = item % num_kv_heads;
            const int64_t base = (q_rows[n] * num_heads + kh * group) * head_dim;
            const uint16_t *next_k = NULL, *next_v = NULL;
            const int64_t *next_blocks = NULL;
            int64_t next_len = 0;
            if (item + 1 < num_items) {
                const int64_t n2 = (item + 1) / num_kv_heads, kh2 = (item + 1) % num_kv_heads;
                next_k = k_cache + kh2 * plane, next_v = v_cache + kh2 * plane;
                next_blocks = block_table + seq_of_query[n2] * max_blocks, next_len = ctx_lens[n2];
            }
            attend_f32_bf16kv(q + base, k_cache + kh * plane, v_cache + kh * plane, out + base,
                              block_table + seq_of_query[n] * max_blocks, ctx_lens[n], block_size, group, head_dim,
                              scale, scores, acc, tile, next_k, next_v, next_blocks, next_len);
        }
        return;
    }
#endif
    attention_f32_bf16kv_generic_team(q, k_cache, v_cache, out, block_table, seq_of_query, ctx_lens, q_rows,
                                      num_queries, num_heads, num_kv_heads, head_dim, num_blocks, block_size,
                                      max_blocks, max_ctx, scale, buf);
}
#pragma GCC pop_options
