/* bf16 <-> fp32 for opd's C kernels: bf16 is the top half of an fp32; rounding to it is to nearest even, and a NaN
 * keeps a set quiet bit (rounding its payload could carry into inf). Scalar and AVX2 (8 lanes) versions. */
#pragma once
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_fp32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float x;
    memcpy(&x, &bits, 4);
    return x;
}

static inline uint16_t fp32_to_bf16(float x) {
    uint32_t bits;
    memcpy(&bits, &x, 4);
    const uint16_t nan = (uint16_t)((bits >> 16) | 0x40);
    const uint16_t rounded = (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
    return x != x ? nan : rounded;
}

static inline __m256 bf16x8_to_fp32(const uint16_t *p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

static inline __m128i fp32x8_to_bf16(__m256 x) {
    const __m256i bits = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40));
    r = _mm256_blendv_epi8(r, quiet, nan);
    /* pack the low 16 bits of each 32-bit lane: packus works per 128-bit half, so reorder the halves after */
    const __m256i packed = _mm256_packus_epi32(r, r);
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

/* x rounded to bf16 and back, 8 lanes (what storing and reloading a bf16 tensor does) */
static inline __m256 round_bf16x8(__m256 x) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(fp32x8_to_bf16(x)), 16));
}
