/* y[b, n] = scale[n] * sum_k x[b, k] * q[n, k]: fp32 activations times weight-only int8 weights, for the few
 * rows of a decode step (opd.cpu_kernels). Two versions of one loop: AVX2 + FMA (opd_int8_gemv) and AVX-512F
 * (opd_int8_gemv_avx512, compiled for that target alone, called only where the CPU has it). Each int8 weight is
 * read once, widened to fp32 in registers and used for up to 4 activation rows; output channels side by side
 * share the activation loads. Exact fp32 accumulation (no rounding of the activations). Built by
 * opd.cpu_kernels on first use. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

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

/* ------------------------------------------------------------------------------------------------ quantising
 * The int8 copy of a weight [N, K] (fp32 or bf16) with one fp32 scale per output channel, the same bits as
 * opd.llama.quantize_int8's torch ops: scale = max |w| / 127 (at least 1e-12), q = round-half-even(w / scale)
 * clamped to [-127, 127]. Every rollout requantises the student's 81M weights; torch's block-wise ops made ~7
 * passes over them (~95 ms a rollout, session 12), this makes one per row while the row sits in L1. */
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

void opd_quantize_int8(const void *w, int bf16, int8_t *q, float *scale, int64_t N, int64_t K, int threads) {
    const int64_t K8 = K & ~(int64_t)7;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const void *row = bf16 ? (const void *)((const uint16_t *)w + n * K) : (const void *)((const float *)w + n * K);
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
        scale[n] = s;
        const __m256 sv = _mm256_set1_ps(s);
        const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
        int8_t *qn = q + n * K;
        for (int64_t k = 0; k < K8; k += 8) {
            /* cvtps rounds half to even (the default MXCSR mode), as torch.round */
            __m256i v = _mm256_cvtps_epi32(_mm256_div_ps(load8(row, bf16, k), sv));
            v = _mm256_min_epi32(_mm256_max_epi32(v, lo), hi);
            const __m128i s16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
            _mm_storel_epi64((__m128i *)(qn + k), _mm_packs_epi16(s16, s16));
        }
        for (int64_t k = K8; k < K; k++) {
            float r = nearbyintf(load1(row, bf16, k) / s);
            qn[k] = (int8_t)(r < -127.0f ? -127.0f : (r > 127.0f ? 127.0f : r));
        }
    }
}
