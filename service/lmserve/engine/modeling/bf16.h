/* bf16 <-> float32 for the C kernels: one definition for all of them.
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

/* Sixteen at a time, where AVX-512 BF16 is available (gemm.c, fused_ops.c, paged_attention.c): loads and
 * stores of up to 16 bf16 values as float32 lanes, masked for a row's tail; vcvtneps2bf16 rounds to
 * nearest even in one instruction. */
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>

static inline __attribute__((always_inline)) __mmask16 mask16(int64_t n) { /* the first min(n, 16) lanes */
    return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1u);
}

static inline __attribute__((always_inline)) __m512 load16_bf16(const bf16 *p, __mmask16 m) { /* off lanes: 0 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

static inline __attribute__((always_inline)) void store16_bf16(bf16 *p, __mmask16 m, __m512 v) {
    _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}

static inline __attribute__((always_inline)) __m512 round16_bf16(__m512 v) { /* to bf16 precision, as float32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}
#endif

#endif
