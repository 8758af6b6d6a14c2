/* bf16 <-> float32 for the C kernels (paged_attention.c, fused_ops.c): one definition for both.
 * Unions, not memcpy, and no branches, so that loops over them vectorise; always_inline so that they
 * inline into functions compiled under other optimisation pragmas too. */
#ifndef LMSERVE_BF16_H
#define LMSERVE_BF16_H
#include <stdint.h>

typedef uint16_t bf16;

static inline __attribute__((always_inline)) float bf16_to_f32(bf16 v) {
    union { uint32_t u; float f; } bits = {.u = (uint32_t)v << 16};
    return bits.f;
}

static inline __attribute__((always_inline)) bf16 f32_to_bf16(float f) { /* round to nearest even, as torch does */
    union { float f; uint32_t u; } bits = {.f = f};
    const uint32_t u = bits.u;
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint32_t nan = (u >> 16) | 0x40u; /* NaN stays NaN (rounding could carry it into inf or 0) */
    return (bf16)((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

#endif
