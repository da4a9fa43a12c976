/* 16-lane bf16 helpers for CPUs with AVX-512 BF16, shared by layer_ops.c (a no-grad layer's and the update's
 * RMSNorm, SiLU x up) and gemm_amx.c (the same steps in the AMX products' epilogues): loads and stores of bf16
 * through fp32, rounding to bf16 (the hardware's round-to-nearest-even, vcvtneps2bf16), a row's RMSNorm and the
 * sigmoid; one copy, so that the fused kernels round where the unfused ops do. */
#pragma once
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "bf16.h"
#include "exp_poly.h"

/* the scalar ends of rows whose length is not a multiple of the vector width (layer_ops.c's AVX2 build too) */
static inline void rms_norm_tail(const uint16_t *xr, const uint16_t *w, uint16_t *yr, float inv, int64_t from,
                                 int64_t n) {
    for (int64_t i = from; i < n; i++)
        yr[i] = fp32_to_bf16(bf16_to_fp32(w[i]) * bf16_to_fp32(fp32_to_bf16(bf16_to_fp32(xr[i]) * inv)));
}

/* (every CPU with avx512_bf16 has AVX-512DQ too: exp_poly.h's _dq exponentials) */
#define BF16_TARGET __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16")))

BF16_TARGET static inline __m512 load16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

BF16_TARGET static inline void store16(uint16_t *p, __m512 x) {
    _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(x));
}

BF16_TARGET static inline __m512 round16(__m512 x) {  /* to bf16 and back */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)), 16));
}

/* 1 / sqrt(mean(x^2) + eps) of one bf16 row (the forward's and the backward's scale). 32 values a load, as their
 * even and odd halves in fp32 (a shift and a mask: no widening shuffle), squared into four chains of sums: a row of
 * 576 in ~28 -> ~13 ns, its whole RMSNorm 132 -> 97 ns (bench/NOTES.md, session 28: then the AMX products' norm
 * after each residual add, since folded into the weights, session 29; now layer_ops.c's norms and the folded norm's
 * first row scales) */
BF16_TARGET static inline float inv_rms16(const uint16_t *xr, int64_t n, float eps) {
    const __m512i high = _mm512_set1_epi32((int)0xFFFF0000);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        const __m512i v = _mm512_loadu_si512(xr + i), u = _mm512_loadu_si512(xr + i + 32);
        const __m512 ve = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), vo = _mm512_castsi512_ps(_mm512_and_si512(v, high));
        const __m512 ue = _mm512_castsi512_ps(_mm512_slli_epi32(u, 16)), uo = _mm512_castsi512_ps(_mm512_and_si512(u, high));
        a0 = _mm512_fmadd_ps(ve, ve, a0);
        a1 = _mm512_fmadd_ps(vo, vo, a1);
        a2 = _mm512_fmadd_ps(ue, ue, a2);
        a3 = _mm512_fmadd_ps(uo, uo, a3);
    }
    for (; i + 32 <= n; i += 32) {
        const __m512i v = _mm512_loadu_si512(xr + i);
        const __m512 ve = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), vo = _mm512_castsi512_ps(_mm512_and_si512(v, high));
        a0 = _mm512_fmadd_ps(ve, ve, a0);
        a1 = _mm512_fmadd_ps(vo, vo, a1);
    }
    float ss = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    for (; i < n; i++) ss += bf16_to_fp32(xr[i]) * bf16_to_fp32(xr[i]);
    return 1.0f / sqrtf(ss / (float)n + eps);
}

/* one row: yr = bf16(w * bf16(xr * rsqrt(mean(xr^2) + eps))) */
BF16_TARGET static inline void rms_norm_row16(const uint16_t *xr, const uint16_t *w, uint16_t *yr, int64_t n, float eps) {
    const int64_t n16 = n & ~(int64_t)15;
    const float inv = inv_rms16(xr, n, eps);
    const __m512 vinv = _mm512_set1_ps(inv);
    for (int64_t i = 0; i < n16; i += 16)
        store16(yr + i, _mm512_mul_ps(load16(w + i), round16(_mm512_mul_ps(load16(xr + i), vinv))));
    rms_norm_tail(xr, w, yr, inv, n16, n);
}

/* sigmoid(g) = 1 / (1 + exp(-g)), the division as a reciprocal estimate refined by one Newton step (~23 bits):
 * three cheap instructions where the division is one in ~10 cycles a lane group. exp(-g) as exp2_16(-g log2 e),
 * capped at 2^126 so that d stays finite (the Newton step would make 0 x inf of an infinite d): SiLU x up 809 ->
 * 637 us at 2048 x 1536, the same bits against torch's (session 19) */
BF16_TARGET static inline __m512 sigmoid16(__m512 g) {
    const __m512 t = _mm512_min_ps(_mm512_mul_ps(g, _mm512_set1_ps(-1.44269504088896341f)), _mm512_set1_ps(126.0f));
    const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), exp2_16_dq(t));
    const __m512 inv = _mm512_rcp14_ps(d);
    return _mm512_mul_ps(inv, _mm512_fnmadd_ps(d, inv, _mm512_set1_ps(2.0f)));
}
