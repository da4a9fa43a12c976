/* exp for softmaxes and SiLU: Cephes expf's range reduction and polynomial (relative error ~2e-7), written so that
 * `omp simd` loops vectorise it (libm's expf is a scalar call). Shared by decode_step.c and vocab_terms.c. */
#pragma once
#include <math.h>
#include <stdint.h>

#pragma omp declare simd
static inline float exp_poly(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } two_n;
    two_n.i = ((int32_t)n + 127) << 23;
    return p * two_n.f;
}
