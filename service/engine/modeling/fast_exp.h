/* fast_expf: exp for the bf16 kernels (paged_attention.c, fused_ops.c). */
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

#endif
