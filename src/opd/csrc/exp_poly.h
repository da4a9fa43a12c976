/* exp for softmaxes and SiLU: Cephes expf's range reduction and polynomial (relative error ~2e-7), written so that
 * `omp simd` loops vectorise it (libm's expf is a scalar call). Shared by decode_step.c, vocab_terms.c, layer_ops.c and
 * attention.c, with the fp32 SiLU x up row of layer_ops.c's and decode_step.c's forwards. */
#pragma once
#include <immintrin.h>
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

/* exp_poly on 8 lanes (gcc does not vectorise exp_poly's clamps and conversions in these loops by itself) */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    const __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x));
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* exp_poly on 16 lanes (AVX-512F; inlined into callers built for a superset of it) */
__attribute__((target("avx512f"))) static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                          _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

/* 2^f by a polynomial of degree `deg` with coefficients c[0] (f^deg) .. c[deg] (Horner), times 2^floor(n) by scalef,
 * which saturates to 0 and inf without a clamp. Callers pass constant coefficients and degree: inlined, the loop unrolls
 * into the FMAs. */
__attribute__((target("avx512f"))) static inline __m512 exp2_16_nf(__m512 n, __m512 f, const float *c, int deg) {
    __m512 p = _mm512_set1_ps(c[0]);
    for (int i = 1; i <= deg; i++) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[i]));
    return _mm512_scalef_ps(p, n);
}

/* 2^t on 16 lanes (AVX-512F): t = n + f with n = round(t) and |f| <= 1/2 */
__attribute__((target("avx512f"))) static inline __m512 exp2_16_poly(__m512 t, const float *c, int deg) {
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return exp2_16_nf(n, _mm512_sub_ps(t, n), c, deg);
}

/* the same with AVX-512DQ's reduce, for callers built for CPUs with bf16 instructions, which all have it: f = t -
 * floor(t) in [0, 1) in one instruction (exact), and t itself goes to scalef, which floors its exponent operand: two
 * instructions where rounding, subtracting and scaling took four (vrndscaleps is two uops on port 0, where the
 * exponentials of a softmax are bound: the bf16 attention 4.5% faster, the gate/up product with its SiLU 4.5%,
 * bench/NOTES.md session 29; the subtraction's turn, 3%, session 30). The coefficients are for [0, 1): p(f) =
 * sqrt(2) q(f - 1/2) of a polynomial q for [-1/2, 1/2] has q's relative error. */
__attribute__((target("avx512f,avx512dq"))) static inline __m512 exp2_16_poly_dq(__m512 t, const float *c, int deg) {
    const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    return exp2_16_nf(t, f, c, deg);
}

/* 2^t by the Taylor polynomial of degree 6 (relative error ~1e-7, as exp16's): nine operations where exp16 takes
 * fifteen. exp(x) = exp2_16(x log2(e)). (session 19) */
static const float EXP2_DEG6[7] = {1.5403530393e-4f, 1.3333558146e-3f, 9.6181291076e-3f, 5.5504108665e-2f,
                                   2.4022650696e-1f, 6.9314718056e-1f, 1.0f};

__attribute__((target("avx512f"))) static inline __m512 exp2_16(__m512 t) { return exp2_16_poly(t, EXP2_DEG6, 6); }

/* EXP2_DEG6 moved to [0, 1) (relative error ~1.2e-7) */
static const float EXP2_DEG6_01[7] = {2.17838816e-4f, 1.23213343e-3f, 9.70485950e-3f, 5.54600136e-2f,
                                      2.40239884e-1f, 6.93144933e-1f, 1.00000016f};

__attribute__((target("avx512f,avx512dq"))) static inline __m512 exp2_16_dq(__m512 t) {
    return exp2_16_poly_dq(t, EXP2_DEG6_01, 6);
}

/* 2^t where bf16's precision is what counts (the bf16 attention's probabilities, rounded to bf16 next; the LM head's
 * log-sum-exp terms of bf16 logits): a degree-4 polynomial (minimax relative error 2.7e-6, against bf16's rounding
 * step of 2^-8: it moves ~0.1% of the roundings by one step), two FMAs fewer than exp2_16 (attention ~4% faster in
 * a harness, bench/NOTES.md, session 27; the head 3.8%, session 29). Its callers all run on CPUs with bf16: DQ. */
__attribute__((target("avx512f,avx512dq"))) static inline __m512 exp2_16_bf16(__m512 t) {
    static const float c[5] = {1.35341669e-2f, 5.20114608e-2f, 2.41442746e-1f, 6.93003810e-1f, 1.00000263f};
    return exp2_16_poly_dq(t, c, 4);
}

/* exp(x) through exp2_16, for x <= 88 (the softmaxes' x - max <= 0): below -87 it goes smoothly to 0, where exp16
 * clamps; otherwise within ~1e-7 of it */
__attribute__((target("avx512f"))) static inline __m512 exp16_scalef(__m512 x) {
    return exp2_16(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)));
}

/* y = silu(g) * u over one fp32 row of n values, 8 lanes (gcc leaves the `omp simd` form of this loop scalar) */
static inline void silu_mul_row8(const float *g, const float *u, float *y, int64_t n) {
    const int64_t n8 = n & ~(int64_t)7;
    const __m256 one = _mm256_set1_ps(1.0f);
    for (int64_t i = 0; i < n8; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
        _mm256_storeu_ps(y + i, _mm256_mul_ps(silu, _mm256_loadu_ps(u + i)));
    }
    for (int64_t i = n8; i < n; i++) y[i] = g[i] / (1.0f + exp_poly(-g[i])) * u[i];
}
