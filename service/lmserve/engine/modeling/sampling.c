/* Temperature sampling on CPU, for rows whose only processor after the penalties is a temperature
 * (no top-k, top-p or min-p): one draw per row by inverting its CDF with one uniform number, as
 * sampler._draw does, without materialising probabilities or their cumulative sums.
 *
 *   sample_temperature_f32   out[r] = the first token whose running mass exceeds u[r] * (the row's mass);
 *                            returns nonzero when its scratch could not be allocated
 *
 * Two passes over each row and a short walk: the max; the mass of each chunk of 64 tokens, exp((x - max)
 * / T) summed, kept (a few KiB a thread); then the chunk sums are walked to the one the target falls in,
 * and only its tokens are looked at. A token whose mass underflows float32, or a -inf logit (a banned
 * token), has none and is never chosen. A row whose mass is not a positive finite number (NaN logits, or a
 * temperature so extreme that it overflows) takes its most likely token, as sampler._random_probs does.
 * The sampler's step at 64 rows of a 49,152-token vocabulary: 6 -> 2.9 ms (benchmarks/profile_step.py).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "abi.h"
#include "kernels.h"

#pragma GCC push_options
#pragma GCC optimize("-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros")
#include "fast_exp.h" /* inside the region, so that it inlines and vectorises */

#define CHUNK 64

/* exp((x - mx) / T); 0 where it would underflow (fast_expf clamps there instead) and for -inf. */
static inline __attribute__((always_inline)) float mass(float x, float mx, float inv_t) {
    const float a = (x - mx) * inv_t;
    return a < -87.3f ? 0.0f : fast_expf(a);
}

static int64_t most_likely(const float *x, int64_t vocab) { /* NaN never wins; all NaN: token 0 */
    int64_t best = 0;
    float mx = -INFINITY;
    for (int64_t i = 0; i < vocab; i++)
        if (x[i] > mx) mx = x[i], best = i;
    return best;
}

static inline __attribute__((always_inline)) float chunk_mass(const float *x, int64_t start, int64_t end, float mx,
                                                              float inv_t) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = start; i < end; i++) sum += mass(x[i], mx, inv_t);
    return sum;
}

/* sums: scratch of ceil(vocab / CHUNK) floats. The total is the chunk sums added in scan order, so the
 * scan's running sum reaches exactly the total and a target below it is always crossed. */
static int64_t sample_row(const float *x, int64_t vocab, float temperature, float u, float *sums) {
    float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
    for (int64_t i = 0; i < vocab; i++) mx = x[i] > mx ? x[i] : mx;
    const float inv_t = 1.0f / temperature;
    const int64_t chunks = (vocab + CHUNK - 1) / CHUNK;
    float total = 0.0f;
    for (int64_t c = 0; c < chunks; c++) {
        sums[c] = chunk_mass(x, c * CHUNK, c * CHUNK + CHUNK < vocab ? c * CHUNK + CHUNK : vocab, mx, inv_t);
        total += sums[c];
    }
    if (!(total > 0.0f) || !isfinite(total) || !isfinite(mx)) return most_likely(x, vocab);
    float target = u * total;
    const float below = nextafterf(total, 0.0f);
    target = target < below ? target : below;
    float run = 0.0f;
    for (int64_t c = 0; c < chunks; c++) {
        if (run + sums[c] > target) { /* the target falls in this chunk: walk its tokens */
            const int64_t end = c * CHUNK + CHUNK < vocab ? c * CHUNK + CHUNK : vocab;
            int64_t last = -1;
            for (int64_t i = c * CHUNK; i < end; i++) {
                const float m = mass(x[i], mx, inv_t);
                if (m > 0.0f) {
                    last = i;
                    run += m;
                    if (run > target) return i;
                }
            }
            return last; /* rounding inside the chunk fell short: its last token with mass (it has one) */
        }
        run += sums[c];
    }
    return most_likely(x, vocab); /* unreachable: run ends at total > target */
}

int sample_temperature_f32(const float *logits, const float *temperatures, const float *uniforms, int64_t *out,
                            int64_t rows, int64_t vocab, int num_threads) {
    int threads = rows * vocab >= 65536 ? num_threads : 1;
    if (threads > rows) threads = (int)rows;
    if (threads < 1) threads = 1;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *sums = team_scratch(sizeof(float) * (size_t)((vocab + CHUNK - 1) / CHUNK), &failed);
        if (sums != NULL) {
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++) out[r] = sample_row(logits + r * vocab, vocab, temperatures[r], uniforms[r], sums);
        }
        free(sums);
    }
    return failed;
}
#pragma GCC pop_options
