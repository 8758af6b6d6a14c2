/* Constrained decoding's token masks applied to float32 logits, in place.
 *
 *   apply_token_bitmask_f32   logits[rows[r], t] = -inf wherever bit t % 32 of mask[r, t / 32] is 0, and
 *                             for every t past the mask's words * 32 tokens; other rows are not touched
 *
 * A mask word of all ones (the common case inside a JSON string) is skipped in one compare, so a row costs
 * about a pass over its 1,536 words: microseconds, where unpacking the bits into a byte mask with torch or
 * numpy and filling through it costs 0.4-1.5 ms a row.
 */
#include <math.h>
#include <stdint.h>

#include "abi.h"

void apply_token_bitmask_f32(float *logits, int64_t row_stride, const int32_t *mask, int64_t words,
                             const int64_t *rows, int64_t num_rows, int64_t vocab) {
    for (int64_t r = 0; r < num_rows; r++) {
        float *x = logits + rows[r] * row_stride;
        const uint32_t *m = (const uint32_t *)(mask + r * words);
        const int64_t covered = words * 32 < vocab ? words * 32 : vocab;
        for (int64_t w = 0; w * 32 < covered; w++) {
            uint32_t bits = m[w];
            if (bits == 0xFFFFFFFFu) continue;
            const int64_t base = w * 32;
            const int64_t n = covered - base < 32 ? covered - base : 32;
            if (bits == 0) { /* most words of a JSON-structure state: 32 stores the compiler vectorises */
                for (int64_t b = 0; b < n; b++) x[base + b] = -INFINITY;
                continue;
            }
            for (int64_t b = 0; b < n; b++)
                if (!((bits >> b) & 1u)) x[base + b] = -INFINITY;
        }
        for (int64_t t = covered; t < vocab; t++) x[t] = -INFINITY;
    }
}
