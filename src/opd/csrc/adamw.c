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
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "quantize.h"

typedef struct {
    float grad_mul, decay, c1, beta1, beta2, c2, eps, step_size, bc2_sqrt;
} AdamW;

static AdamW adamw_of(float grad_mul, float lr, float beta1, float beta2, float eps, float weight_decay,
                      float step_size, float bc2_sqrt) {
    return (AdamW){grad_mul, 1.0f - lr * weight_decay, 1.0f - beta1, beta1, beta2, 1.0f - beta2, eps, step_size, bc2_sqrt};
}

/* The step on 8 values (g: their gradients, before grad_mul). */
static inline void adamw8(const AdamW *a, float *param, __m256 g, float *m, float *v, uint16_t *copy) {
    g = _mm256_mul_ps(g, _mm256_set1_ps(a->grad_mul));
    __m256 p = _mm256_mul_ps(_mm256_loadu_ps(param), _mm256_set1_ps(a->decay));
    __m256 mi = _mm256_loadu_ps(m);
    mi = _mm256_fmadd_ps(_mm256_set1_ps(a->c1), _mm256_sub_ps(g, mi), mi);
    __m256 vi = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(a->c2), g), g,
                                _mm256_mul_ps(_mm256_loadu_ps(v), _mm256_set1_ps(a->beta2)));
    const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vi), _mm256_set1_ps(a->bc2_sqrt)),
                                       _mm256_set1_ps(a->eps));
    p = _mm256_sub_ps(p, _mm256_div_ps(_mm256_mul_ps(_mm256_set1_ps(a->step_size), mi), denom));
    _mm256_storeu_ps(m, mi);
    _mm256_storeu_ps(v, vi);
    _mm256_storeu_ps(param, p);
    if (copy) _mm_storeu_si128((__m128i *)copy, fp32x8_to_bf16(p));
}

/* The step on values [i0, i1). A tail of fewer than 8 goes through the same vector code from a copy on the stack:
 * scalar C would round differently where the compiler fuses a product into a sum, so a value's step would depend
 * on where a chunk happens to end (opd_adamw_step's and opd_adamw_step_int8's differ). */
static void adamw_range(const AdamW *a, float *param, const void *grad, int grad_bf16, float *m, float *v,
                        uint16_t *copy, int64_t i0, int64_t i1) {
    const int64_t i8 = i0 + ((i1 - i0) & ~(int64_t)7);
    for (int64_t i = i0; i < i8; i += 8) {
        adamw8(a, param + i, load8(grad, grad_bf16, i), m + i, v + i, copy ? copy + i : NULL);
    }
    if (i8 == i1) return;
    float pt[8] = {0}, mt[8] = {0}, vt[8] = {0}, gt[8] = {0};
    uint16_t ct[8];
    const int64_t t = i1 - i8;
    for (int64_t k = 0; k < t; k++) {
        pt[k] = param[i8 + k], mt[k] = m[i8 + k], vt[k] = v[i8 + k];
        gt[k] = load1(grad, grad_bf16, i8 + k);
    }
    adamw8(a, pt, _mm256_loadu_ps(gt), mt, vt, ct);
    for (int64_t k = 0; k < t; k++) {
        param[i8 + k] = pt[k], m[i8 + k] = mt[k], v[i8 + k] = vt[k];
        if (copy) copy[i8 + k] = ct[k];
    }
}

/* grad: bf16 (grad_bf16 = 1) or fp32; copy: bf16, or NULL for none. */
void opd_adamw_step(float *param, const void *grad, int grad_bf16, float *m, float *v, uint16_t *copy, int64_t n,
                    float grad_mul, float lr, float beta1, float beta2, float eps, float weight_decay, float step_size,
                    float bc2_sqrt, int threads) {
    const AdamW a = adamw_of(grad_mul, lr, beta1, beta2, eps, weight_decay, step_size, bc2_sqrt);
    const int64_t chunk = 4096;  /* a multiple of 16: every chunk starts on a cache line of bf16 and fp32 values */
    const int64_t chunks = (n + chunk - 1) / chunk;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < chunks; c++)
        adamw_range(&a, param, grad, grad_bf16, m, v, copy, c * chunk, c * chunk + chunk < n ? c * chunk + chunk : n);
}

/* The same step on a weight of `rows` rows of K values, also writing the int8 rows and fp32 scales of the bf16 copy
 * it writes (quantize.h's bits, as opd.llama.quantize_int8 of the copy): the rollout's int8 decode weights come out
 * of the optimizer's pass while each row is in L1, instead of a requantising pass over every weight before each
 * rollout (~16 ms for the 81M half-depth student, session 18). */
void opd_adamw_step_int8(float *param, const void *grad, int grad_bf16, float *m, float *v, uint16_t *copy,
                         int64_t rows, int64_t K, int8_t *q, float *scale, float grad_mul, float lr, float beta1,
                         float beta2, float eps, float weight_decay, float step_size, float bc2_sqrt, int threads) {
    const AdamW a = adamw_of(grad_mul, lr, beta1, beta2, eps, weight_decay, step_size, bc2_sqrt);
    quantize_wide_now();
    /* a row at a time, quantised right after its step: 53 -> 56 ms for the 81M student's weights, where chunks of
     * 7 and 32 rows took 63 and 57 ms (session 18) */
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        adamw_range(&a, param, grad, grad_bf16, m, v, copy, r * K, r * K + K);
        quantize_row(copy + r * K, 1, q + r * K, scale + r, K);
    }
}

/* sum(x[i]^2) of n values (bf16 = 1: bf16, else fp32): fp32 lanes, an fp64 total. */
static double sum_squares_range(const void *x, int bf16, int64_t n) {
    const int64_t n8 = n & ~(int64_t)7, n32 = n & ~(int64_t)31;
    /* four sums: one waits on the FMA's latency (4 cycles) and bounds the pass at ~24 GB/s of bf16 with 2 cores */
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (int64_t i = 0; i < n32; i += 32) {
        const __m256 g0 = load8(x, bf16, i), g1 = load8(x, bf16, i + 8), g2 = load8(x, bf16, i + 16),
                     g3 = load8(x, bf16, i + 24);
        a0 = _mm256_fmadd_ps(g0, g0, a0), a1 = _mm256_fmadd_ps(g1, g1, a1);
        a2 = _mm256_fmadd_ps(g2, g2, a2), a3 = _mm256_fmadd_ps(g3, g3, a3);
    }
    for (int64_t i = n32; i < n8; i += 8) {
        const __m256 g = load8(x, bf16, i);
        a0 = _mm256_fmadd_ps(g, g, a0);
    }
    const __m256 acc = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    double s = 0.0;
    for (int k = 0; k < 8; k++) s += lanes[k];
    for (int64_t i = n8; i < n; i++) {
        const float g = load1(x, bf16, i);
        s += (double)g * g;
    }
    return s;
}

/* The sum of squares of `count` tensors of one dtype (x[i]: n[i] values) in one parallel pass: the gradient's norm
 * over every parameter without a call and a thread team per parameter (137 of them, most small, in the half-depth
 * SmolLM2 student; with the four sums above, the norm 10.1 -> 7.9 ms a step, session 18). fp64 per chunk of 8192
 * values; -1 where there is no memory for the list of chunks. */
double opd_sum_squares_many(const void *const *x, const int64_t *n, int64_t count, int bf16, int threads) {
    const int64_t chunk = 8192;
    int64_t chunks = 0;
    for (int64_t t = 0; t < count; t++) chunks += (n[t] + chunk - 1) / chunk;
    int64_t *owner = (int64_t *)malloc((size_t)(chunks > 0 ? chunks : 1) * 2 * sizeof(int64_t));
    if (!owner) return -1.0;
    int64_t c = 0;
    for (int64_t t = 0; t < count; t++)
        for (int64_t i0 = 0; i0 < n[t]; i0 += chunk) owner[2 * c] = t, owner[2 * c + 1] = i0, c++;
    double total = 0.0;
    #pragma omp parallel for schedule(static) reduction(+ : total) num_threads(threads)
    for (int64_t k = 0; k < chunks; k++) {
        const int64_t t = owner[2 * k], i0 = owner[2 * k + 1];
        const int64_t len = n[t] - i0 < chunk ? n[t] - i0 : chunk;
        const void *base = bf16 ? (const void *)((const uint16_t *)x[t] + i0) : (const void *)((const float *)x[t] + i0);
        total += sum_squares_range(base, bf16, len);
    }
    free(owner);
    return total;
}
