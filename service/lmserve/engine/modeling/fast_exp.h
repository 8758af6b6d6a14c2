/* fast_expf: exp for the bf16 kernels (paged_attention.c, fused_ops.c); exp16 and silu_mul16, its AVX-512
 * form (fused_ops.c, gemm.c). */
#ifndef LMSERVE_FAST_EXP_H
#define LMSERVE_FAST_EXP_H
#include <math.h>
#include <stdint.h>
#include <string.h>

/* exp for the bf16 kernels: Cody-Waite range reduction and a degree-6 polynomial (Cephes' expf), about
 * 2 ulp in float32, far below bf16's resolution; unlike libm's expf it vectorises. The float32 kernel
 * keeps libm's expf so its results stay the ones the exactness suite holds to transformers. */
static inline __attribute__((always_inline)) float fast_expf(float x) {
    x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    const float f = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * f + 1.3981999507e-3f;
    p = p * f + 8.3334519073e-3f;
    p = p * f + 4.1665795894e-2f;
    p = p * f + 1.6666665459e-1f;
    p = p * f + 5.0000001201e-1f;
    p = p * f * f + f + 1.0f;
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* The same, sixteen lanes at a time with fused multiply-adds, where AVX-512 BF16 is (bf16.h). */
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include "bf16.h"

static inline __attribute__((always_inline)) __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
    const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                          _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(f, f), _mm512_add_ps(f, _mm512_set1_ps(1.0f)));
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

/* bf16(silu(g)) * u, as float32 lanes (the caller rounds it when it stores): g and u hold bf16 values.
 * SiLU's division by a reciprocal estimate and one Newton step (~28 bits): vdivps alone cost more than the
 * rest. fused_ops.c's silu_mul and gemm.c's fused gate/up epilogue both compute it here, so that they agree
 * bit for bit. */
static inline __attribute__((always_inline)) __m512 silu_mul16(__m512 g, __m512 u) {
    const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)));
    __m512 r = _mm512_rcp14_ps(d);
    r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
    return _mm512_mul_ps(round16_bf16(_mm512_mul_ps(g, r)), u);
}
#endif

#endif
