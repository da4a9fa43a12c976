/* One AdamW step of an fp32 parameter (the master weight) from a bf16 gradient, writing the bf16 copy that the next
 * forward and backward (and the rollout) read, in one pass over memory (opd.update.bf16). torch's fused AdamW would
 * need the gradient cast to fp32 first, its clip applied as another pass, and the bf16 copy refreshed after: four
 * passes over ~80M parameters on a host that streams them at ~10-40 GB/s (bench/NOTES.md, session 14).
 *
 * The arithmetic is torch's fused CPU AdamW (aten/src/ATen/native/cpu/FusedAdamKernel.cpp) in fp32:
 *   g = grad * grad_mul                      (grad_mul: the gradient clip's coefficient)
 *   p = p * (1 - lr * wd)
 *   m = m + (1 - beta1) * (g - m)            (lerp)
 *   v = v * beta2 + (1 - beta2) * g * g
 *   p = p - step_size * m / (sqrt(v) / bc2_sqrt + eps)
 *   copy = bf16(p), rounded to nearest even (NaN stays NaN)
 * AVX2 + FMA, 8 values a lane; OpenMP over cache-line-aligned chunks. Built by opd.cpu_kernels on first use. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

/* grad: bf16 (grad_bf16 = 1) or fp32; copy: bf16, or NULL for none. */
void opd_adamw_step(float *param, const void *grad, int grad_bf16, float *m, float *v, uint16_t *copy, int64_t n,
                    float grad_mul, float lr, float beta1, float beta2, float eps, float weight_decay, float step_size,
                    float bc2_sqrt, int threads) {
    const float decay = 1.0f - lr * weight_decay, c1 = 1.0f - beta1, c2 = 1.0f - beta2;
    const int64_t chunk = 4096;  /* a multiple of 16: every chunk starts on a cache line of bf16 and fp32 values */
    const int64_t chunks = (n + chunk - 1) / chunk;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t i0 = c * chunk, i1 = i0 + chunk < n ? i0 + chunk : n;
        const int64_t i8 = i0 + ((i1 - i0) & ~(int64_t)7);
        const __m256 vmul = _mm256_set1_ps(grad_mul), vdecay = _mm256_set1_ps(decay), vc1 = _mm256_set1_ps(c1),
                     vb2 = _mm256_set1_ps(beta2), vc2 = _mm256_set1_ps(c2), vbc2 = _mm256_set1_ps(bc2_sqrt),
                     veps = _mm256_set1_ps(eps), vstep = _mm256_set1_ps(step_size);
        for (int64_t i = i0; i < i8; i += 8) {
            __m256 g = grad_bf16 ? bf16x8_to_fp32((const uint16_t *)grad + i) : _mm256_loadu_ps((const float *)grad + i);
            g = _mm256_mul_ps(g, vmul);
            __m256 p = _mm256_mul_ps(_mm256_loadu_ps(param + i), vdecay);
            __m256 mi = _mm256_loadu_ps(m + i);
            mi = _mm256_fmadd_ps(vc1, _mm256_sub_ps(g, mi), mi);
            __m256 vi = _mm256_fmadd_ps(_mm256_mul_ps(vc2, g), g, _mm256_mul_ps(_mm256_loadu_ps(v + i), vb2));
            const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vi), vbc2), veps);
            p = _mm256_sub_ps(p, _mm256_div_ps(_mm256_mul_ps(vstep, mi), denom));
            _mm256_storeu_ps(m + i, mi);
            _mm256_storeu_ps(v + i, vi);
            _mm256_storeu_ps(param + i, p);
            if (copy) _mm_storeu_si128((__m128i *)(copy + i), fp32x8_to_bf16(p));
        }
        for (int64_t i = i8; i < i1; i++) {
            float g = (grad_bf16 ? bf16_to_fp32(((const uint16_t *)grad)[i]) : ((const float *)grad)[i]) * grad_mul;
            float p = param[i] * decay;
            m[i] = fmaf(c1, g - m[i], m[i]);
            v[i] = fmaf(c2 * g, g, v[i] * beta2);
            p = p - step_size * m[i] / (sqrtf(v[i]) / bc2_sqrt + eps);
            param[i] = p;
            if (copy) copy[i] = fp32_to_bf16(p);
        }
    }
}

/* The sum of squares of a bf16 (bf16 = 1) or fp32 tensor, accumulated in fp64 per chunk (for the gradient's norm). */
double opd_sum_squares(const void *x, int bf16, int64_t n, int threads) {
    const int64_t chunk = 8192;
    const int64_t chunks = (n + chunk - 1) / chunk;
    double total = 0.0;
    #pragma omp parallel for schedule(static) reduction(+ : total) num_threads(threads)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t i0 = c * chunk, i1 = i0 + chunk < n ? i0 + chunk : n;
        const int64_t i8 = i0 + ((i1 - i0) & ~(int64_t)7);
        __m256 acc = _mm256_setzero_ps();
        for (int64_t i = i0; i < i8; i += 8) {
            const __m256 g = bf16 ? bf16x8_to_fp32((const uint16_t *)x + i) : _mm256_loadu_ps((const float *)x + i);
            acc = _mm256_fmadd_ps(g, g, acc);
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, acc);
        double s = 0.0;
        for (int k = 0; k < 8; k++) s += lanes[k];
        for (int64_t i = i8; i < i1; i++) {
            const float g = bf16 ? bf16_to_fp32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
            s += (double)g * g;
        }
        total += s;
    }
    return total;
}
