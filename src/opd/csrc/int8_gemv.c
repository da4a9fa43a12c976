/* y[b, n] = scale[n] * sum_k x[b, k] * q[n, k]: fp32 activations times weight-only int8 weights, for the few
 * rows of a decode step (opd.cpu_kernels). Two versions of one loop: AVX2 + FMA (opd_int8_gemv) and AVX-512F
 * (opd_int8_gemv_avx512, compiled for that target alone, called only where the CPU has it). Each int8 weight is
 * read once, widened to fp32 in registers and used for up to 4 activation rows; output channels side by side
 * share the activation loads. Exact fp32 accumulation (no rounding of the activations). Built by
 * opd.cpu_kernels on first use. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"


static inline __m256 widen8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* Output channels [n0, n1) for B <= 4 rows of x (row stride K) into y (row stride N). */
static void channels(const float *x, int B, const int8_t *q, const float *scale, float *y, int64_t N, int64_t K,
                     int64_t n0, int64_t n1) {
    const int64_t K8 = K & ~(int64_t)7;
    for (int64_t n = n0; n < n1; n += 2) {
        const int two = n + 1 < n1;
        const int8_t *q0 = q + n * K, *q1 = two ? q0 + K : q0;
        __m256 a[4][2];
        for (int b = 0; b < 4; b++) a[b][0] = a[b][1] = _mm256_setzero_ps();
        for (int64_t k = 0; k < K8; k += 8) {
            const __m256 w0 = widen8(q0 + k), w1 = widen8(q1 + k);
            for (int b = 0; b < 4; b++) {  /* unrolled by the compiler; B is 1-4 */
                if (b < B) {
                    const __m256 xv = _mm256_loadu_ps(x + b * K + k);
                    a[b][0] = _mm256_fmadd_ps(w0, xv, a[b][0]);
                    a[b][1] = _mm256_fmadd_ps(w1, xv, a[b][1]);
                }
            }
        }
        for (int b = 0; b < B; b++) {
            float s0 = hsum(a[b][0]), s1 = hsum(a[b][1]);
            for (int64_t k = K8; k < K; k++) {  /* K not a multiple of 8 */
                s0 += x[b * K + k] * q0[k];
                s1 += x[b * K + k] * q1[k];
            }
            y[b * N + n] = scale[n] * s0;
            if (two) y[b * N + n + 1] = scale[n + 1] * s1;
        }
    }
}

void opd_int8_gemv(const float *x, int B, const int8_t *q, const float *scale, float *y, int64_t N, int64_t K,
                   int threads) {
    const int64_t blocks = (N + 63) / 64;  /* 64 channels a task: the int8 rows of a block stay in L2 */
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t n0 = blk * 64, n1 = n0 + 64 < N ? n0 + 64 : N;
        for (int b = 0; b < B; b += 4)
            channels(x + (int64_t)b * K, B - b < 4 ? B - b : 4, q, scale, y + (int64_t)b * N, N, K, n0, n1);
    }
}

/* ------------------------------------------------------------------------------------------------ AVX-512
 * The same product with 16-wide registers, for CPUs with AVX-512F (opd.cpu_kernels picks it by the CPU's flags):
 * per 16 weights of a channel one widening load and one conversion, then one FMA per activation row, so the
 * conversion is amortised over up to 4 rows as above; four output channels at a time share each activation load.
 * On a 2-core Xeon with AMX (session 11) this ran 1.3-1.5x torch's kernel (and the AVX2 loop) at 1-16 rows; the
 * weights stream from L3 / memory there, so the prefetch below matters as much as the width. */
__attribute__((target("avx512f")))
static inline __m512 widen16(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

__attribute__((target("avx512f"), always_inline))
static inline void channels512(const float *x, const int B, const int8_t *q, const float *scale, float *y, int64_t N, int64_t K,
                        int64_t n0, int64_t n1) {
    const int64_t K16 = K & ~(int64_t)15;
    for (int64_t n = n0; n < n1; n += 4) {
        const int C = n1 - n < 4 ? (int)(n1 - n) : 4;
        const int8_t *qc[4];
        for (int c = 0; c < 4; c++) qc[c] = q + (n + (c < C ? c : 0)) * K;  /* a short tail repeats channel n */
        __m512 a[4][4];
        for (int b = 0; b < 4; b++)
            for (int c = 0; c < 4; c++) a[b][c] = _mm512_setzero_ps();
        /* The next four channels' rows, prefetched a cache line at a time while these four run: with the
         * weights streaming from L3 / memory, this overlap gave 1.17x at 4 rows and 1.35x at 1 row (session 11). */
        const int8_t *ahead = q + (n + 4 < n1 ? n + 4 : n) * K;
        for (int64_t k = 0; k < K16; k += 16) {
            if ((k & 63) == 0)
                for (int c = 0; c < 4; c++) _mm_prefetch((const char *)(ahead + c * K + k), _MM_HINT_T0);
            const __m512 w0 = widen16(qc[0] + k), w1 = widen16(qc[1] + k), w2 = widen16(qc[2] + k),
                         w3 = widen16(qc[3] + k);
            for (int b = 0; b < 4; b++) {  /* unrolled by the compiler; B is 1-4 */
                if (b < B) {
                    const __m512 xv = _mm512_loadu_ps(x + b * K + k);
                    a[b][0] = _mm512_fmadd_ps(w0, xv, a[b][0]);
                    a[b][1] = _mm512_fmadd_ps(w1, xv, a[b][1]);
                    a[b][2] = _mm512_fmadd_ps(w2, xv, a[b][2]);
                    a[b][3] = _mm512_fmadd_ps(w3, xv, a[b][3]);
                }
            }
        }
        for (int b = 0; b < B; b++)
            for (int c = 0; c < C; c++) {
                float s = _mm512_reduce_add_ps(a[b][c]);
                for (int64_t k = K16; k < K; k++) s += x[b * K + k] * qc[c][k];  /* K not a multiple of 16 */
                y[b * N + n + c] = scale[n + c] * s;
            }
    }
}

__attribute__((target("avx512f")))
void opd_int8_gemv_avx512(const float *x, int B, const int8_t *q, const float *scale, float *y, int64_t N, int64_t K,
                          int threads) {
    const int64_t blocks = (N + 63) / 64;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t n0 = blk * 64, n1 = n0 + 64 < N ? n0 + 64 : N;
        for (int b = 0; b < B; b += 4) {
            const float *xb = x + (int64_t)b * K;
            float *yb = y + (int64_t)b * N;
            switch (B - b < 4 ? B - b : 4) {  /* a copy of the loop for each row count: no per-row branches */
                case 1: channels512(xb, 1, q, scale, yb, N, K, n0, n1); break;
                case 2: channels512(xb, 2, q, scale, yb, N, K, n0, n1); break;
                case 3: channels512(xb, 3, q, scale, yb, N, K, n0, n1); break;
                default: channels512(xb, 4, q, scale, yb, N, K, n0, n1); break;
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------------ AVX-512 VNNI
 * The same product with the activations as int16 and integer dot products (vpdpwssd: 32 int16 pairs a
 * instruction into 16 int32 sums). Why: at 4 rows the fp32 loop above is bound by its arithmetic, not by the
 * weights streaming in: per 16 weights a widening load, a conversion and 4 FMAs (bench/NOTES.md, session 13);
 * here per 32 weights one widening load (int8 -> int16) and one instruction per row. Each activation row is
 * rounded once per call to int16 with its own scale (max |x| / 32767): an error of at most 1/65534 of the row's
 * largest value, ~100x finer than bf16 activations (the update's precision). Sums are exact int32: a lane adds
 * K / 16 products of at most 32767 * 127, below 2^31 for K <= VNNI_MAX_K (longer rows take the fp32 loop), and
 * the 16 lanes are added in int64. */
#define VNNI_MAX_K 8192
#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

VNNI_TARGET static inline __m512i widen32(const int8_t *p, __mmask32 m) {
    return _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, p));
}

VNNI_TARGET __attribute__((always_inline)) static inline void channels_vnni(
        const int16_t *x, const float *xs, const int B, int64_t Kp, const int8_t *q, const float *scale, float *y,
        int64_t N, int64_t K, int64_t n0, int64_t n1) {
    const __mmask32 tail = (K & 31) ? (__mmask32)((1u << (K & 31)) - 1) : (__mmask32)0xFFFFFFFFu;
    for (int64_t n = n0; n < n1; n += 4) {
        const int C = n1 - n < 4 ? (int)(n1 - n) : 4;
        const int8_t *qc[4];
        for (int c = 0; c < 4; c++) qc[c] = q + (n + (c < C ? c : 0)) * K;  /* a short tail repeats channel n */
        __m512i a[4][4];
        for (int b = 0; b < 4; b++)
            for (int c = 0; c < 4; c++) a[b][c] = _mm512_setzero_si512();
        const int8_t *ahead = q + (n + 4 < n1 ? n + 4 : n) * K;
        for (int64_t k = 0; k < K; k += 32) {
            const __mmask32 m = k + 32 <= K ? (__mmask32)0xFFFFFFFFu : tail;
            if ((k & 63) == 0)
                for (int c = 0; c < 4; c++) _mm_prefetch((const char *)(ahead + c * K + k), _MM_HINT_T0);
            const __m512i w0 = widen32(qc[0] + k, m), w1 = widen32(qc[1] + k, m), w2 = widen32(qc[2] + k, m),
                          w3 = widen32(qc[3] + k, m);
#pragma GCC unroll 4
            for (int b = 0; b < 4; b++) {  /* unrolled by the compiler; B is 1-4 */
                if (b < B) {
                    const __m512i xv = _mm512_loadu_si512((const void *)(x + b * Kp + k));  /* zero past K */
                    a[b][0] = _mm512_dpwssd_epi32(a[b][0], w0, xv);
                    a[b][1] = _mm512_dpwssd_epi32(a[b][1], w1, xv);
                    a[b][2] = _mm512_dpwssd_epi32(a[b][2], w2, xv);
                    a[b][3] = _mm512_dpwssd_epi32(a[b][3], w3, xv);
                }
            }
        }
        /* the sums leave the registers through one aligned store each: indexing a[][] by a loop variable
         * here made gcc keep all 16 accumulators in memory, stored every step of the loop above */
        int32_t sums[4][4][16] __attribute__((aligned(64)));
#pragma GCC unroll 4
        for (int b = 0; b < 4; b++)
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++)
                if (b < B) _mm512_store_si512((void *)sums[b][c], a[b][c]);
        for (int b = 0; b < B; b++)
            for (int c = 0; c < C; c++) {
                int64_t t = 0;  /* each lane fits in int32, their total need not */
                for (int i = 0; i < 16; i++) t += sums[b][c][i];
                y[b * N + n + c] = scale[n + c] * xs[b] * (float)t;
            }
    }
}

/* x [B, K] fp32 -> x16 [B, Kp] int16 (Kp = K rounded up to 32, zeros past K) and xs [B]: x ~= xs * x16. */
static void round_rows_int16(const float *x, int B, int64_t K, int64_t Kp, int16_t *x16, float *xs) {
    for (int b = 0; b < B; b++) {
        const float *xb = x + (int64_t)b * K;
        float top = 0.0f;
        for (int64_t k = 0; k < K; k++) top = fabsf(xb[k]) > top ? fabsf(xb[k]) : top;
        const float s = top / 32767.0f, inv = top > 0.0f ? 32767.0f / top : 0.0f;
        xs[b] = s;
        int16_t *ob = x16 + (int64_t)b * Kp;
#pragma omp simd
        for (int64_t k = 0; k < K; k++) {
            float r = nearbyintf(xb[k] * inv);
            ob[k] = (int16_t)(r > 32767.0f ? 32767.0f : (r < -32767.0f ? -32767.0f : r));
        }
        for (int64_t k = K; k < Kp; k++) ob[k] = 0;
    }
}

VNNI_TARGET static void gemv_vnni(const float *x, int B, const int8_t *q, const float *scale, float *y, int64_t N,
                                  int64_t K, int threads) {
    const int64_t Kp = (K + 31) & ~(int64_t)31;
    /* the rounded rows (a few KB; one small allocation a call costs well under a microsecond) */
    float *xs = (float *)malloc((size_t)B * sizeof(float) + (size_t)B * Kp * sizeof(int16_t) + 64);
    int16_t *x16 = (int16_t *)(((uintptr_t)(xs + B) + 63) & ~(uintptr_t)63);
    round_rows_int16(x, B, K, Kp, x16, xs);
    const int64_t blocks = (N + 63) / 64;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t n0 = blk * 64, n1 = n0 + 64 < N ? n0 + 64 : N;
        for (int b = 0; b < B; b += 4) {
            const int16_t *xb = x16 + (int64_t)b * Kp;
            float *yb = y + (int64_t)b * N;
            switch (B - b < 4 ? B - b : 4) {
                case 1: channels_vnni(xb, xs + b, 1, Kp, q, scale, yb, N, K, n0, n1); break;
                case 2: channels_vnni(xb, xs + b, 2, Kp, q, scale, yb, N, K, n0, n1); break;
                case 3: channels_vnni(xb, xs + b, 3, Kp, q, scale, yb, N, K, n0, n1); break;
                default: channels_vnni(xb, xs + b, 4, Kp, q, scale, yb, N, K, n0, n1); break;
            }
        }
    }
    free(xs);
}

/* ------------------------------------------------------------------------------------------------ AMX
 * The same product on the AMX tile unit (Intel since Sapphire Rapids): its int8 dot products (tdpbssd: a 16 x 64
 * by 64 x 16 int8 product into 16 x 16 int32 sums) take the arithmetic off the vector unit, so a decode step is
 * bound by the weights streaming in, not by the few rows they multiply (bench/NOTES.md, session 13).
 *
 * Roles: the weights are the left operand (a tile is 16 output channels x 64 of K, straight from the row-major
 * int8 rows, no repacking) and the activations the right one, packed per call in the tile unit's layout (rows
 * of 4 consecutive k for each column). Activations are int8 there, so each row x is split in two int8 terms:
 * hi = round(x / s1), s1 = max |x| / 127, and lo = round((x - s1 hi) / s2), s2 = s1 / 254: x = s1 hi + s2 lo to
 * within s2 / 2 = max |x| / 64516, as fine as the VNNI build's int16. Up to 8 rows a pass: columns 0..nb-1 hold
 * the rows' hi terms, nb..2nb-1 their lo terms. Needs N % 16 == 0 and K % 64 == 0, and the tile state, which
 * Linux hands out only to processes that ask (opd_amx_request: ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA). */
#include "amx.h"
#define AMX_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8")))


/* x rows [b0, b0 + nb) -> the right operand for every 64 of K: [K / 64][16 rows][2 nb columns x 4 bytes],
 * and the two scales of each row. 16 values of k at a time (K % 64 == 0 here): their 16 hi bytes are 4 tile
 * rows' 4 bytes of column b, and likewise the lo bytes in column nb + b. */
AMX_TARGET static void pack_rows_amx(const float *x, int64_t K, int nb, int8_t *packed, float *s_hi, float *s_lo) {
    const int rowbytes = 8 * nb;
    for (int b = 0; b < nb; b++) {
        const float *xb = x + (int64_t)b * K;
        __m512 m = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(xb + k)));
        const float top = _mm512_reduce_max_ps(m);
        const float s1 = top / 127.0f, s2 = s1 / 254.0f;
        s_hi[b] = s1;
        s_lo[b] = s2;
        const __m512 inv1 = _mm512_set1_ps(top > 0.0f ? 127.0f / top : 0.0f),
                     inv2 = _mm512_set1_ps(top > 0.0f ? 254.0f * 127.0f / top : 0.0f), v1 = _mm512_set1_ps(s1),
                     lim = _mm512_set1_ps(127.0f), nlim = _mm512_set1_ps(-127.0f);
        for (int64_t k = 0; k < K; k += 16) {
            const __m512 v = _mm512_loadu_ps(xb + k);
            const __m512 h = _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(_mm512_mul_ps(v, inv1), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), nlim), lim);
            const __m512 r = _mm512_fnmadd_ps(h, v1, v);  /* v - h s1 */
            const __m512 l = _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(_mm512_mul_ps(r, inv2), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), nlim), lim);
            const __m128i hb = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(h)), lb = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(l));
            int8_t *row = packed + (k / 64) * 16 * rowbytes + ((k % 64) / 4) * rowbytes;
            int32_t hw[4], lw[4];
            _mm_storeu_si128((__m128i *)hw, hb);
            _mm_storeu_si128((__m128i *)lw, lb);
            for (int j = 0; j < 4; j++) {
                memcpy(row + j * rowbytes + b * 4, &hw[j], 4);
                memcpy(row + j * rowbytes + (nb + b) * 4, &lw[j], 4);
            }
        }
    }
}

/* 32 output channels at a time, two 16-channel sum tiles (0, 1). Tiles are not renamed: a load into a tile
 * waits for the products still reading it, so even and odd chunks of K load into their own tiles (weights 2, 3
 * or 4, 5; activations 6 or 7) and the next chunk's loads overlap this chunk's products. */
#define AMX_CHUNK(W0, W1, X, k)                                                       \
    do {                                                                              \
        _tile_loadd(X, packed + ((k) / 64) * 16 * rowbytes, rowbytes);               \
        _tile_loadd(W0, a + (k), K);                                                  \
        _tile_dpbssd(0, W0, X);                                                       \
        if (two) { _tile_loadd(W1, a + 16 * K + (k), K); _tile_dpbssd(1, W1, X); }   \
    } while (0)

AMX_TARGET static void channels_amx(const int8_t *q, const float *scale, const int8_t *packed, const float *s_hi,
                                    const float *s_lo, int nb, float *y, int64_t N, int64_t K, int64_t n0, int64_t n1) {
    const int rowbytes = 8 * nb;
    int32_t out[2][16][16] __attribute__((aligned(64)));
    for (int64_t n = n0; n < n1; n += 32) {
        const int two = n + 32 <= n1;
        const int8_t *a = q + n * K;
        /* the next 32 channels' rows (one contiguous stretch of 32 K bytes) into L2 while these run, K / 2
         * cache lines a chunk: tile loads read 16 rows at a stride of K, which the hardware prefetchers follow
         * poorly */
        const char *next = (const char *)(a + 32 * K);
        _tile_zero(0);
        _tile_zero(1);
        int64_t k = 0;
        for (; k + 128 <= K; k += 128) {
            if (n + 32 < N)
                for (int i = 0; i < 64; i++) _mm_prefetch(next + (k / 2 + i) * 64, _MM_HINT_T1);
            AMX_CHUNK(2, 3, 6, k);
            AMX_CHUNK(4, 5, 7, k + 64);
        }
        if (k < K) AMX_CHUNK(2, 3, 6, k);
        _tile_stored(0, out[0], 64);
        if (two) _tile_stored(1, out[1], 64);
        for (int c = 0; c < 1 + two; c++)
            for (int i = 0; i < 16; i++) {
                const int64_t ch = n + 16 * c + i;
                for (int b = 0; b < nb; b++)
                    y[b * N + ch] = scale[ch] * (s_hi[b] * (float)out[c][i][b] + s_lo[b] * (float)out[c][i][nb + b]);
            }
    }
}

AMX_TARGET static void gemv_amx(const float *x, int B, const int8_t *q, const float *scale, float *y, int64_t N,
                                 int64_t K, int threads) {
    int8_t *packed = (int8_t *)malloc((size_t)K * 16 + 64);  /* 8 rows x 2 terms x K bytes */
    for (int b0 = 0; b0 < B; b0 += 8) {
        const int nb = B - b0 < 8 ? B - b0 : 8;
        float s_hi[8], s_lo[8];
        pack_rows_amx(x + (int64_t)b0 * K, K, nb, packed, s_hi, s_lo);
        const int64_t blocks = (N + 31) / 32;  /* 32 channels a task: a 576-channel product splits 9 / 9 */
        #pragma omp parallel num_threads(threads)
        {
            TileConfig cfg __attribute__((aligned(64)));
            memset(&cfg, 0, sizeof cfg);
            cfg.palette = 1;
            for (int t = 0; t < 8; t++) /* sums 0-1, weights 2-5, activations 6-7 */
                cfg.rows[t] = 16, cfg.colsb[t] = (uint16_t)(t >= 2 && t < 6 ? 64 : 8 * nb);
            _tile_loadconfig(&cfg);
            #pragma omp for schedule(static)
            for (int64_t blk = 0; blk < blocks; blk++) {
                const int64_t n0 = blk * 32, n1 = n0 + 32 < N ? n0 + 32 : N;
                channels_amx(q, scale, packed, s_hi, s_lo, nb, y + (int64_t)b0 * N, N, K, n0, n1);
            }
            _tile_release();
        }
    }
    free(packed);
}

/* The VNNI build's entry point: the tile unit from amx_min_rows rows where the process may use it and the shapes
 * fit, the vector loop otherwise. Where the crossover lies depends on the host: the vector loop's arithmetic grows
 * with the rows while the tile loop's passes are bound by the weights streaming in. On one 2-core Xeon the tile
 * loop lost at 1-4 rows (session 13) and on the same machine in another phase, with the weights in L3, it won
 * from 2-3 rows (session 17); opd.cpu_kernels times both at load and sets the crossover (opd_amx_set_min_rows). */
#define AMX_MAX_K 131072 /* a tile's int32 sum takes K products of at most 127 * 127 */
static int amx_granted = 0;
static int amx_min_rows = 8;

void opd_amx_set_min_rows(int rows) { amx_min_rows = rows; }
int opd_amx_get_min_rows(void) { return amx_granted ? amx_min_rows : -1; }

int opd_amx_request(void) {
    amx_granted = amx_request_state();
    return amx_granted;
}

void opd_int8_gemv_vnni(const float *x, int B, const int8_t *q, const float *scale, float *y, int64_t N, int64_t K,
                        int threads) {
    if (amx_granted && B >= amx_min_rows && N % 16 == 0 && K % 64 == 0 && K <= AMX_MAX_K)
        gemv_amx(x, B, q, scale, y, N, K, threads);
    else if (K <= VNNI_MAX_K)
        gemv_vnni(x, B, q, scale, y, N, K, threads);
    else
        opd_int8_gemv_avx512(x, B, q, scale, y, N, K, threads);
}

/* For the tests: each loop on its own, whatever the rows. */
void opd_int8_gemv_vnni_loop(const float *x, int B, const int8_t *q, const float *scale, float *y, int64_t N,
                             int64_t K, int threads) {
    gemv_vnni(x, B, q, scale, y, N, K, threads);
}

void opd_int8_gemv_amx(const float *x, int B, const int8_t *q, const float *scale, float *y, int64_t N, int64_t K,
                       int threads) {
    if (amx_granted && N % 16 == 0 && K % 64 == 0)
        gemv_amx(x, B, q, scale, y, N, K, threads);
    else
        gemv_vnni(x, B, q, scale, y, N, K, threads);
}

/* ------------------------------------------------------------------------------------------------ quantising
 * Every rollout requantises the student's 81M weights where no optimizer step wrote them already (quantize.h);
 * torch's block-wise ops made ~7 passes over them (~95 ms a rollout, session 12), this makes one per row while the
 * row sits in L1. */
#include "quantize.h"

void opd_quantize_set_wide(int on) { quantize_wide = on; } /* the tests run both loops */

void opd_quantize_int8(const void *w, int bf16, int8_t *q, float *scale, int64_t N, int64_t K, int threads) {
    const int64_t row_bytes = K * (bf16 ? 2 : 4);
    quantize_wide_now();
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) quantize_row((const char *)w + n * row_bytes, bf16, q + n * K, scale + n, K);
}
