/* Small helpers shared by opd's C kernels. */
#pragma once
#include <immintrin.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* the sum of 8 fp32 lanes */
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* the mask of an AVX-512 vector's first `left` lanes (all 16 from 16 on, none from 0 down): the tail of a row */
static inline __mmask16 first16(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : (left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1));
}

/* this OpenMP thread's part of a scratch buffer holding `bytes` for each thread */
static inline void *thread_part(void *scratch, int64_t bytes) {
#ifdef _OPENMP
    return (char *)scratch + bytes * omp_get_thread_num();
#else
    return scratch;
#endif
}
