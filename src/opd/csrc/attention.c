/* Causal self-attention of fp32 rows that start at position 0, without grad: the fp32 teacher's scoring forward
 * (opd.llama.causal_hidden). torch's flash kernel for the CPU ran these products at ~140 GFLOP/s here, a third of
 * what the machine's fp32 matmuls reach (bench/NOTES.md, session 15); this one keeps a block of 4 query rows and
 * 64 keys in registers: the scores Q K^T, an online softmax (running max and sum, as flash attention), then P V.
 *
 * qkv: [B, L, H + 2 KV, D] as opd.llama's fused projection writes it (queries, keys, values; RoPE applied);
 * out: [B, L, H, D]. Query head h reads key / value head h / (H / KV) (grouped-query attention). D = 64. AVX-512F;
 * the rows' blocks in parallel on torch's OpenMP threads. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "exp_poly.h"

#define T512 __attribute__((target("avx512f")))
#define QR 4   /* query rows a block */
#define KB 64  /* keys a block: 4 vectors of 16 */
#define D 64   /* the head dimension: 4 vectors of 16 */
#define CHUNK 32  /* query rows a task (8 blocks): small enough to balance the causal triangle's uneven rows */

/* S[r][0 .. 16 ng) = q_r . K^T for the keys of this block, from K^T packed as [D][Lp] (kt points at key k0) */
T512 static inline __attribute__((always_inline)) void scores(const float *q[QR], const float *kt, int64_t Lp, int ng,
                                                           float S[QR][KB]) {
    __m512 acc[QR][4];
    for (int r = 0; r < QR; r++)
        for (int g = 0; g < 4; g++) acc[r][g] = _mm512_setzero_ps();
    for (int d = 0; d < D; d++) {
        __m512 k[4];
        for (int g = 0; g < ng; g++) k[g] = _mm512_loadu_ps(kt + d * Lp + 16 * g);
        for (int r = 0; r < QR; r++) {
            const __m512 qb = _mm512_set1_ps(q[r][d]);
            for (int g = 0; g < ng; g++) acc[r][g] = _mm512_fmadd_ps(qb, k[g], acc[r][g]);
        }
    }
    for (int r = 0; r < QR; r++)
        for (int g = 0; g < ng; g++) _mm512_storeu_ps(S[r] + 16 * g, acc[r][g]);
}

/* The same with ng a constant in each branch: the loops unrolled and the accumulators in registers. */
T512 static void scores_block(const float *q[QR], const float *kt, int64_t Lp, int ng, float S[QR][KB]) {
    switch (ng) {
        case 1: scores(q, kt, Lp, 1, S); break;
        case 2: scores(q, kt, Lp, 2, S); break;
        case 3: scores(q, kt, Lp, 3, S); break;
        default: scores(q, kt, Lp, 4, S); break;
    }
}

/* K^T of every (batch, key head): kt [B, KV, D, Lp], Lp = L rounded up to 16 (the padding is never read unmasked). */
T512 static void pack_keys(const float *qkv, float *kt, int64_t B, int64_t L, int64_t Lp, int64_t H, int64_t KV,
                           int threads) {
    const int64_t NH = H + 2 * KV;
    #pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = 0; j < KV; j++) {
            float *dst = kt + (b * KV + j) * D * Lp;
            for (int64_t t = 0; t < Lp; t++) {
                const float *k = qkv + ((b * L + (t < L ? t : L - 1)) * NH + H + j) * D;
                for (int64_t d = 0; d < D; d++) dst[d * Lp + t] = k[d];
            }
        }
}

/* kt: scratch of B * KV * D * Lp floats. */
T512 void opd_causal_attention_f32(const float *qkv, float *out, float *kt, int64_t B, int64_t L, int64_t H,
                                   int64_t KV, float scale, int threads) {
    const int64_t NH = H + 2 * KV, Lp = (L + 15) & ~(int64_t)15, group = H / KV;
    const int64_t chunks = (L + CHUNK - 1) / CHUNK;
    pack_keys(qkv, kt, B, L, Lp, H, KV, threads);
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t task = 0; task < B * H * chunks; task++) {
        /* the last chunks (the longest rows) first: the dynamic schedule then ends on short ones */
        const int64_t c = chunks - 1 - task % chunks, h = (task / chunks) % H, b = task / (chunks * H);
        const float *ktb = kt + (b * KV + h / group) * D * Lp;
        const float *vb = qkv + (b * L * NH + H + KV + h / group) * D;  /* value row t at vb + t * NH * D */
        const int64_t q_end = (c + 1) * CHUNK < L ? (c + 1) * CHUNK : L;
        for (int64_t q0 = c * CHUNK; q0 < q_end; q0 += QR) {
            const float *q[QR];
            for (int r = 0; r < QR; r++) q[r] = qkv + ((b * L + (q0 + r < L ? q0 + r : L - 1)) * NH + h) * D;
            __m512 o[QR][4];
            float m[QR], l[QR];
            for (int r = 0; r < QR; r++) {
                m[r] = -INFINITY, l[r] = 0.0f;
                for (int g = 0; g < 4; g++) o[r][g] = _mm512_setzero_ps();
            }
            const int64_t kend = q0 + QR < L ? q0 + QR : L;  /* keys 0 .. kend - 1: the block's last row's */
            for (int64_t k0 = 0; k0 < kend; k0 += KB) {
                const int64_t nk = kend - k0 < KB ? kend - k0 : KB;
                const int ng = (int)((nk + 15) / 16);
                float S[QR][KB] __attribute__((aligned(64)));
                float P[QR][KB] __attribute__((aligned(64)));
                scores_block(q, ktb + k0, Lp, ng, S);
                for (int r = 0; r < QR; r++) {
                    /* row q0 + r sees keys up to itself: in the last block (where k0 + KB passes q0) the rest are masked */
                    const int64_t valid = q0 + r + 1 - k0;  /* >= 1: key 0 of the row's first block is always seen */
                    __m512 s[4];
                    __m512 mx = _mm512_set1_ps(-INFINITY);
                    for (int g = 0; g < ng; g++) {
                        const int64_t left = valid - 16 * g;
                        const __mmask16 keep = left >= 16 ? 0xFFFF : (left <= 0 ? 0 : (__mmask16)((1u << left) - 1));
                        s[g] = _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), keep, _mm512_loadu_ps(S[r] + 16 * g),
                                                  _mm512_set1_ps(scale));
                        mx = _mm512_max_ps(mx, s[g]);
                    }
                    const float m_new = fmaxf(m[r], _mm512_reduce_max_ps(mx));
                    const float corr = expf(m[r] - m_new);  /* 0 on the first block (m = -inf) */
                    __m512 sum = _mm512_setzero_ps();
                    const __m512 vm = _mm512_set1_ps(m_new);
                    for (int g = 0; g < ng; g++) {
                        /* exp16 clamps at -87: a masked score (-inf) must give exactly 0 */
                        const __mmask16 seen = _mm512_cmp_ps_mask(s[g], _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
                        const __m512 p = _mm512_maskz_mov_ps(seen, exp16(_mm512_sub_ps(s[g], vm)));
                        sum = _mm512_add_ps(sum, p);
                        _mm512_store_ps(P[r] + 16 * g, p);
                    }
                    l[r] = l[r] * corr + _mm512_reduce_add_ps(sum);
                    m[r] = m_new;
                    const __m512 vc = _mm512_set1_ps(corr);
                    for (int g = 0; g < 4; g++) o[r][g] = _mm512_mul_ps(o[r][g], vc);
                }
                for (int64_t j = 0; j < nk; j++) {
                    const float *v = vb + (k0 + j) * NH * D;
                    __m512 vv[4];
                    for (int g = 0; g < 4; g++) vv[g] = _mm512_loadu_ps(v + 16 * g);
                    for (int r = 0; r < QR; r++) {
                        const __m512 pb = _mm512_set1_ps(P[r][j]);
                        for (int g = 0; g < 4; g++) o[r][g] = _mm512_fmadd_ps(pb, vv[g], o[r][g]);
                    }
                }
            }
            for (int r = 0; r < QR && q0 + r < L; r++) {
                float *dst = out + ((b * L + q0 + r) * H + h) * D;
                const __m512 inv = _mm512_set1_ps(1.0f / l[r]);
                for (int g = 0; g < 4; g++) _mm512_storeu_ps(dst + 16 * g, _mm512_mul_ps(o[r][g], inv));
            }
        }
    }
}
