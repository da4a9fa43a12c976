/* The int8 copy of a weight's rows (fp32 or bf16) with one fp32 scale per output channel, the same bits as
 * opd.llama.quantize_int8's torch ops: scale = max |w| / 127 (at least 1e-12), q = round-half-even(w * (1 / scale))
 * clamped to [-127, 127]. A product by the row's reciprocal, not a division per value (the whole requantisation of
 * 81M weights 16.4 -> 14.2 ms here, session 18); q differs from round(w / scale) by one step only where w / scale
 * lies within an ulp or two of a half, as good a nearest step. One row at a time while it sits in L1: int8_gemv.c
 * requantises whole weights with it, adamw.c the rows its optimizer step has just written (opd.update.bf16). */
#ifndef OPD_QUANTIZE_H
#define OPD_QUANTIZE_H
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "simd.h"

static inline __m256 load8(const void *w, int bf16, int64_t i) {
    if (bf16) {
        const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    return _mm256_loadu_ps((const float *)w + i);
}

static inline float load1(const void *w, int bf16, int64_t i) {
    if (bf16) {
        union { uint32_t u; float f; } v;
        v.u = (uint32_t)((const uint16_t *)w)[i] << 16;
        return v.f;
    }
    return ((const float *)w)[i];
}

/* One row of K values, 8 lanes wide (AVX2). */
static void quantize_row8(const void *row, int bf16, int8_t *qn, float *scale, int64_t K) {
    const int64_t K8 = K & ~(int64_t)7;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_setzero_ps();
    for (int64_t k = 0; k < K8; k += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, load8(row, bf16, k)));
    float top = 0.0f, lanes[8];
    _mm256_storeu_ps(lanes, m);
    for (int i = 0; i < 8; i++) top = lanes[i] > top ? lanes[i] : top;
    for (int64_t k = K8; k < K; k++) {
        const float a = fabsf(load1(row, bf16, k));
        top = a > top ? a : top;
    }
    float s = top / 127.0f;
    s = s < 1e-12f ? 1e-12f : s;
    *scale = s;
    const __m256 sv = _mm256_set1_ps(1.0f / s);
    const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
    for (int64_t k = 0; k < K8; k += 8) {
        /* cvtps rounds half to even (the default MXCSR mode), as torch.round */
        __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(load8(row, bf16, k), sv));
        v = _mm256_min_epi32(_mm256_max_epi32(v, lo), hi);
        const __m128i s16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        _mm_storel_epi64((__m128i *)(qn + k), _mm_packs_epi16(s16, s16));
    }
    for (int64_t k = K8; k < K; k++) {
        float r = nearbyintf(load1(row, bf16, k) * (1.0f / s));
        qn[k] = (int8_t)(r < -127.0f ? -127.0f : (r > 127.0f ? 127.0f : r));
    }
}

/* The same row 16 lanes wide (AVX-512F/BW), tails by masked loads and stores: half as many instructions. */
#define QUANT16 __attribute__((target("avx512f,avx512bw,avx512vl")))

/* load8 in 16 lanes, the lanes outside `in` zero */
QUANT16 static inline __m512 load16(const void *w, int bf16, int64_t i, __mmask16 in) {
    if (bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(in, (const uint16_t *)w + i)), 16));
    return _mm512_maskz_loadu_ps(in, (const float *)w + i);
}

QUANT16 static void quantize_row16(const void *w, int bf16, int8_t *qn, float *scale, int64_t K) {
    __m512 m = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 in = first16(K - k);
        m = _mm512_max_ps(m, _mm512_abs_ps(load16(w, bf16, k, in)));
    }
    float s = _mm512_reduce_max_ps(m) / 127.0f;
    s = s < 1e-12f ? 1e-12f : s;
    *scale = s;
    const __m512 sv = _mm512_set1_ps(1.0f / s);
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 in = first16(K - k);
        const __m512i v = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(load16(w, bf16, k, in), sv)), lo), hi);
        _mm_mask_storeu_epi8(qn + k, in, _mm512_cvtepi32_epi8(v));
    }
}

/* Which row loop: 16 lanes where the CPU has AVX-512BW and VL (decided on the first call), unless set. */
static int quantize_wide = -1;

static inline int quantize_wide_now(void) {
    if (quantize_wide < 0) quantize_wide = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
    return quantize_wide;
}

static inline void quantize_row(const void *row, int bf16, int8_t *qn, float *scale, int64_t K) {
    if (quantize_wide_now())
        quantize_row16(row, bf16, qn, scale, K);
    else
        quantize_row8(row, bf16, qn, scale, K);
}
#endif
