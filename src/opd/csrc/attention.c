/* Causal self-attention of fp32 rows that start at position 0, without grad: the fp32 teacher's scoring forward
 * (opd.llama.causal_hidden). torch's flash kernel for the CPU ran these products at ~140 GFLOP/s here, a third of
 * what the machine's fp32 matmuls reach (bench/NOTES.md, session 15); this one keeps a block of 4 query rows and
 * 64 keys in registers: the scores Q K^T, their exponentials, then P V. The exponentials are shifted by each row's
 * score of key 0 (rows_shifted), with no running max to rescale the sums by block after block (20% faster than
 * that online softmax, session 30), which takes the rows only where a score lies too far above key 0's.
 *
 * qkv: [B, L, H + 2 KV, D] as opd.llama's fused projection writes it (queries, keys, values; RoPE applied);
 * out: [B, L, H, D]. Query head h reads key / value head h / (H / KV) (grouped-query attention). D = 64. AVX-512F;
 * the rows' blocks in parallel on torch's OpenMP threads. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "exp_poly.h"
#include "simd.h"

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

/* o[r] += P[r] V for the block's nk keys (value row j at v + j NH D) */
T512 static inline __attribute__((always_inline)) void pv_block(const float P[QR][KB], const float *v, int64_t NH, int64_t nk, __m512 o[QR][4]) {
    for (int64_t j = 0; j < nk; j++) {
        __m512 vv[4];
        for (int g = 0; g < 4; g++) vv[g] = _mm512_loadu_ps(v + j * NH * D + 16 * g);
        for (int r = 0; r < QR; r++) {
            const __m512 pb = _mm512_set1_ps(P[r][j]);
            for (int g = 0; g < 4; g++) o[r][g] = _mm512_fmadd_ps(pb, vv[g], o[r][g]);
        }
    }
}

/* the rows' outputs o[r] / l[r] (rows past L: none) */
T512 static inline __attribute__((always_inline)) void write_rows(__m512 o[QR][4], const float l[QR], float *out_rows[QR],
                                                                  int64_t q0, int64_t L) {
    for (int r = 0; r < QR && q0 + r < L; r++) {
        const __m512 inv = _mm512_set1_ps(1.0f / l[r]);
        for (int g = 0; g < 4; g++) _mm512_storeu_ps(out_rows[r] + 16 * g, _mm512_mul_ps(o[r][g], inv));
    }
}

/* Rows q0 .. q0 + QR - 1 (their queries q) of one head, online softmax: each block of keys rescales the rows' sums
 * and outputs to the block's max. Writes the rows' outputs (rows past L: none). */
T512 static void rows_online(const float *q[QR], const float *ktb, const float *vb, float *out_rows[QR], int64_t q0,
                             int64_t L, int64_t Lp, int64_t NH, float scale) {
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
                const __mmask16 keep = first16(left);
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
        pv_block(P, vb + k0 * NH * D, NH, nk, o);
    }
    write_rows(o, l, out_rows, q0, L);
}

/* The same rows with each row's score of key 0 as its shift instead of a running max (softmax_streamed in the
 * bf16 part below says why that loses nothing): no max, no rescaling of the sums and outputs a block. Returns 0
 * (nothing written) where a row's sum reaches 2^100; rows_online then takes the rows. */
T512 static int rows_shifted(const float *q[QR], const float *ktb, const float *vb, float *out_rows[QR], int64_t q0,
                             int64_t L, int64_t Lp, int64_t NH, float scale) {
    const float k2 = scale * 1.44269504088896341f;
    __m512 o[QR][4], sum[QR], shift[QR];
    for (int r = 0; r < QR; r++) {
        sum[r] = _mm512_setzero_ps();
        for (int g = 0; g < 4; g++) o[r][g] = _mm512_setzero_ps();
    }
    const __m512 vk = _mm512_set1_ps(k2);
    const int64_t kend = q0 + QR < L ? q0 + QR : L;
    for (int64_t k0 = 0; k0 < kend; k0 += KB) {
        const int64_t nk = kend - k0 < KB ? kend - k0 : KB;
        const int ng = (int)((nk + 15) / 16);
        float S[QR][KB] __attribute__((aligned(64)));
        float P[QR][KB] __attribute__((aligned(64)));
        scores_block(q, ktb + k0, Lp, ng, S);
        if (k0 == 0)
            for (int r = 0; r < QR; r++) shift[r] = _mm512_set1_ps(-k2 * S[r][0]);
        for (int r = 0; r < QR; r++) {
            const int64_t valid = q0 + r + 1 - k0;
            for (int g = 0; g < ng; g++) {
                const __m512 p = _mm512_maskz_mov_ps(first16(valid - 16 * g),
                                                     exp2_16(_mm512_fmadd_ps(_mm512_loadu_ps(S[r] + 16 * g), vk, shift[r])));
                sum[r] = _mm512_add_ps(sum[r], p);
                _mm512_store_ps(P[r] + 16 * g, p);
            }
        }
        pv_block(P, vb + k0 * NH * D, NH, nk, o);
    }
    float l[QR];
    for (int r = 0; r < QR; r++) {
        l[r] = _mm512_reduce_add_ps(sum[r]);
        if (q0 + r < L && !(l[r] < 0x1p100f)) return 0;
    }
    write_rows(o, l, out_rows, q0, L);
    return 1;
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
            float *out_rows[QR];
            for (int r = 0; r < QR; r++) {
                q[r] = qkv + ((b * L + (q0 + r < L ? q0 + r : L - 1)) * NH + h) * D;
                out_rows[r] = out + ((b * L + q0 + r) * H + h) * D;
            }
            if (!rows_shifted(q, ktb, vb, out_rows, q0, L, Lp, NH, scale))
                rows_online(q, ktb, vb, out_rows, q0, L, Lp, NH, scale);
        }
    }
}

/* ------------------------------------------------------------------------------------------------ bf16, AMX
 * The same attention for bf16 rows on the AMX tile unit (Intel since Sapphire Rapids): the bf16 teacher's scoring
 * forward. torch's flash kernel took ~2.2 ms a layer at 8 x 256 (SmolLM2-135M: 9 query heads, 3 key / value
 * heads) for 0.6 GFLOP of causal products; this one ~1.3 ms (bench/NOTES.md, session 19).
 *
 * For 32 query rows of one head, 32 keys at a time up to the last row's, the scores S = Q K^T go to a 4 KB fp32
 * buffer (tile products: tdpbf16ps, a 16 x 32 by 32 x 16 bf16 product into 16 x 16 fp32 sums; each key tile in two
 * products, one per 16 rows), and each row's exponentials of them, rounded to bf16 unnormalised, into P; then
 * O = P V, tile products over the keys in 2 x 2 blocks as gemm_amx.c's, is divided by the row's sum at the end (as
 * torch's flash kernel rounds). The softmax is exact over each row's keys, with no online rescaling: its shift is
 * the row's score of key 0 rather than its max (softmax_streamed says why that loses nothing, and what happens
 * where a score is too far above key 0's). P is kept tile by tile (each tile's 16 rows in one contiguous 1 KB), so
 * that a tile load touches 16 consecutive lines (rows at their own stride, 1 KB at 512 keys, put a tile's 16 lines
 * in few of L1's sets: the scores' stores had cost twice as long that way, session 28). The products' right
 * operands are packed per (batch, key
 * head) in the tile unit's layout (pairs of consecutive k for each column): K^T per 16 keys, V per 32 keys and 16
 * columns, by the thread that takes the (batch, key head)'s tasks, into a buffer of its own that stays in its L2.
 * A task is one block of 32 query rows of every query head of a key head. D = 64; the tile state needs
 * opd_attention_amx_request (amx.h). */
#include <string.h>

#include "amx.h"

#define AMXBF16 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")))
#define QB 32  /* query rows a task: two row tiles */

static int att_amx_granted = 0;

int opd_attention_amx_request(void) {
    att_amx_granted = amx_request_state();
    return att_amx_granted;
}

/* A thread's buffers, in bytes (Lp = L rounded up to 32): the packed keys and values of one (batch, key head), then
 * S (every score of the rows, for softmax_exact; softmax_streamed uses its first 4 KB), P, Q, O of
 * attention_rows_amx; each a multiple of 64 bytes. */
static int64_t packed_bytes(int64_t Lp) { return Lp * D * 2 * 2; }
int64_t opd_attention_bf16_scratch_bytes(int64_t L) {
    const int64_t Lp = (L + 31) & ~(int64_t)31;
    return packed_bytes(Lp) + QB * Lp * 4 + QB * Lp * 2 + QB * D * 2 + QB * D * 4;
}

/* r[i][c] -> r[c][i] for a 16 x 16 block of dwords: pairs of rows interleaved by dwords, then by pairs of dwords
 * (u[4g + j], lane L: column 4 L + j of rows 4g .. 4g + 3), then the 128-bit lanes gathered. K^T's packing by
 * gathers (one per pair of d, 16 keys' rows each) had taken ~5% of attention. */
AMXBF16 static inline void transpose16_epi32(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int g = 0; g < 4; g++) {
        u[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
        u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
    }
    for (int j = 0; j < 4; j++) {
        const __m512i x0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x44), x1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xEE);
        const __m512i y0 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x44), y1 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xEE);
        r[j] = _mm512_shuffle_i32x4(x0, y0, 0x88);
        r[4 + j] = _mm512_shuffle_i32x4(x0, y0, 0xDD);
        r[8 + j] = _mm512_shuffle_i32x4(x1, y1, 0x88);
        r[12 + j] = _mm512_shuffle_i32x4(x1, y1, 0xDD);
    }
}

/* kp: [Lp / 16][32 rows][16 keys x 2]: K^T of keys k0 .. k0 + 15, rows 0-15 the pairs of d 0..31, 16-31 of d 32..63.
 * vp: [Lp / 32][4 column blocks][16 rows][16 columns x 2]: row i holds values of keys 2i and 2i + 1 of the block.
 * Keys past L are zeros (their probabilities are zeros too: 0 x 0, never 0 x NaN). K: 16 keys' rows transposed as
 * dwords (pairs of d); V: two keys' 16 columns interleaved by one permute. */
AMXBF16 static void pack_kv_bf16(const uint16_t *qkv, uint16_t *kp, uint16_t *vp, int64_t b, int64_t j, int64_t L,
                                 int64_t Lp, int64_t H, int64_t KV) {
    const int64_t NH = H + 2 * KV;
    const uint16_t *k0 = qkv + (b * L * NH + H + j) * D, *v0 = qkv + (b * L * NH + H + KV + j) * D;
    for (int64_t t0 = 0; t0 < Lp; t0 += 16) {  /* 16 keys' 32 pairs of d (two 16 x 16 blocks of dwords), transposed */
        __m512i lo[16], hi[16];
        for (int n = 0; n < 16; n++) {
            const __m512i *k = (const __m512i *)(k0 + (t0 + n) * NH * D);
            lo[n] = t0 + n < L ? _mm512_loadu_si512(k) : _mm512_setzero_si512();
            hi[n] = t0 + n < L ? _mm512_loadu_si512(k + 1) : _mm512_setzero_si512();
        }
        transpose16_epi32(lo);
        transpose16_epi32(hi);
        uint32_t *dst = (uint32_t *)kp + t0 * 32;
        for (int dp = 0; dp < 16; dp++) {
            _mm512_storeu_si512(dst + dp * 16, lo[dp]);
            _mm512_storeu_si512(dst + (16 + dp) * 16, hi[dp]);
        }
    }
    /* word i of the result: even i from the first key's column i / 2, odd i from the second's */
    const __m512i mix = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                         39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    for (int64_t t = 0; t < Lp; t += 2) {
        const int64_t blk = t / 32, i = (t % 32) / 2;
        for (int64_t cb = 0; cb < D / 16; cb++) {
            const __m256i a = t < L ? _mm256_loadu_si256((const __m256i *)(v0 + t * NH * D + cb * 16)) : _mm256_setzero_si256();
            const __m256i c = t + 1 < L ? _mm256_loadu_si256((const __m256i *)(v0 + (t + 1) * NH * D + cb * 16))
                                        : _mm256_setzero_si256();
            const __m512i pair = _mm512_permutex2var_epi16(_mm512_castsi256_si512(a), mix, _mm512_castsi256_si512(c));
            _mm512_storeu_si512(vp + ((blk * 4 + cb) * 16 + i) * 32, pair);
        }
    }
}

/* 32 keys of a row: their scores' two tiles' lines s, s + 256 to e = 2^(s k2 + shift) (zeros outside masks m0, m1),
 * rounded into one vector of 32 bf16 at p, and the sum with their sum as rounded, by the bf16 dot product with ones
 * (one instruction where converting back and adding took three). Constant masks fold away where inlined. */
AMXBF16 static inline __m512 exp_step(const float *s, uint16_t *p, __m512 vk, __m512 shift, __mmask16 m0, __mmask16 m1,
                                      __m512 sum) {
    const __m512 e0 = _mm512_maskz_mov_ps(m0, exp2_16_bf16(_mm512_fmadd_ps(_mm512_load_ps(s), vk, shift)));
    const __m512 e1 = _mm512_maskz_mov_ps(m1, exp2_16_bf16(_mm512_fmadd_ps(_mm512_load_ps(s + 256), vk, shift)));
    const __m512bh eb = _mm512_cvtne2ps_pbh(e1, e0);
    _mm512_store_si512(p, (__m512i)eb);
    return _mm512_dpbf16_ps(sum, eb, (__m512bh)_mm512_set1_epi16(0x3F80));
}

/* the largest of a row's first `valid` scores */
AMXBF16 static inline float row_max(const float *s, int64_t valid) {
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __m512 mx = ninf, m1 = ninf, m2 = ninf, m3 = ninf;  /* four chains: one waited on each max's latency */
    int64_t k = 0;
    for (; k + 64 <= valid; k += 64) {
        mx = _mm512_max_ps(mx, _mm512_load_ps(s + 16 * k));
        m1 = _mm512_max_ps(m1, _mm512_load_ps(s + 16 * k + 256));
        m2 = _mm512_max_ps(m2, _mm512_load_ps(s + 16 * k + 512));
        m3 = _mm512_max_ps(m3, _mm512_load_ps(s + 16 * k + 768));
    }
    for (; k < valid; k += 16) mx = _mm512_max_ps(mx, _mm512_mask_load_ps(ninf, first16(valid - k), s + 16 * k));
    return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(mx, m1), _mm512_max_ps(m2, m3)));
}

/* a row's e = 2^(k2 s + shift) into P (zeros past `valid` up to kb32 x 32 keys); returns their sum */
AMXBF16 static inline float row_exp(const float *s, uint16_t *p, int64_t valid, int64_t kb32, __m512 vk, float shift_) {
    const __m512 shift = _mm512_set1_ps(shift_);
    __m512 sum = _mm512_setzero_ps();
    int64_t k;
    for (k = 0; k + 32 <= valid; k += 32)  /* whole steps: no masks (their setting took a fifth of a step) */
        sum = exp_step(s + 16 * k, p + 16 * k, vk, shift, 0xFFFF, 0xFFFF, sum);
    if (k < valid) {  /* the row's last keys; past `valid`: zeros */
        sum = exp_step(s + 16 * k, p + 16 * k, vk, shift, first16(valid - k), first16(valid - k - 16), sum);
        k += 32;
    }
    for (; k < kb32 * 32; k += 32) _mm512_store_si512(p + 16 * k, _mm512_setzero_si512());
    return _mm512_reduce_add_ps(sum);
}

/* S = Q K^T for key tile kt (16 keys) of both row tiles (Q in tiles 0-3) into s0 (rows 0-15) and s1 (16-31) */
AMXBF16 static inline void score_tile(const uint16_t *kp, int64_t kt, float *s0, float *s1) {
    _tile_zero(6);
    _tile_zero(7);
    _tile_loadd(4, kp + kt * 32 * 32, 64);
    _tile_loadd(5, kp + (kt * 32 + 16) * 32, 64);
    _tile_dpbf16ps(6, 0, 4);
    _tile_dpbf16ps(7, 2, 4);
    _tile_dpbf16ps(6, 1, 5);
    _tile_dpbf16ps(7, 3, 5);
    _tile_stored(6, s0, 64);
    _tile_stored(7, s1, 64);
}

/* P and 1 / sum of the rows' exponentials (scale k2 in base 2) in one pass over the keys, 32 at a time: their scores
 * go through a 4 KB buffer that stays in L1, each step's tile products and exponentials together in the core's
 * window. The shift is each row's score of key 0, not its max, which would need every score first (a 64 KB buffer
 * at 512 keys, from L2, and a pass over it: attention 14-17% faster without, bench/NOTES.md, session 30). Softmax
 * does not depend on the shift, and in fp32 and bf16 a term's relative precision does not depend on its size: only
 * overflow could lose anything, and nothing underflows that counts (key 0 is among the row's keys, so the largest
 * term is >= 1). Returns 0 where a row's sum reaches 2^100, i.e. where a score lies more than ~69 / scale above
 * key 0's (no term has overflowed before 2^128): softmax_exact then redoes the rows with their max. */
AMXBF16 static int softmax_streamed(const uint16_t *kp, float *Sb, uint16_t *P, int64_t Lp, int64_t rows, int64_t kb32,
                                    float k2, float inv[QB]) {
    const __m512 vk = _mm512_set1_ps(k2);
    float shift[QB];
    __m512 sum[QB];
    for (int64_t kb = 0; kb < kb32; kb++) {
        score_tile(kp, 2 * kb, Sb, Sb + 512);
        score_tile(kp, 2 * kb + 1, Sb + 256, Sb + 768);  /* row r's 32 keys at Sb + (r >> 4) 512 + (r & 15) 16 (+ 256) */
        if (kb == 0)
            for (int r = 0; r < QB; r++) shift[r] = -k2 * Sb[(r >> 4) * 512 + (r & 15) * 16], sum[r] = _mm512_setzero_ps();
        uint16_t *pk = P + 32 * 16 * kb;  /* row r's keys 32 kb .. at pk + (r >> 4) 16 Lp + (r & 15) 32 */
        if (kb < kb32 - 1) {
            /* a row tile at a time, its rows at constant offsets (the row's offsets computed from r took ~10 scalar
             * instructions a step: 4-8% of attention, bench/NOTES.md session 30) */
            for (int t = 0; t < 2; t++) {
                const float *s = Sb + t * 512, *sh = shift + 16 * t;
                uint16_t *p = pk + t * 16 * Lp;
                __m512 *sm = sum + 16 * t;
                for (int i = 0; i < 16; i++)
                    sm[i] = exp_step(s + 16 * i, p + 32 * i, vk, _mm512_set1_ps(sh[i]), 0xFFFF, 0xFFFF, sm[i]);
            }
        } else {  /* the diagonal block (keys q0 .. q0 + 31): row r sees r + 1 of them; rows past L none */
            for (int r = 0; r < QB; r++) {
                const int64_t valid = r < rows ? r + 1 : 0;
                sum[r] = exp_step(Sb + (r >> 4) * 512 + (r & 15) * 16, pk + (r >> 4) * 16 * Lp + (r & 15) * 32, vk,
                                  _mm512_set1_ps(shift[r]), first16(valid), first16(valid - 16), sum[r]);
            }
        }
    }
    for (int r = 0; r < QB; r++) {
        const float total = _mm512_reduce_add_ps(sum[r]);
        if (r < rows && !(total < 0x1p100f)) return 0;
        inv[r] = r < rows ? 1.0f / total : 0.0f;
    }
    return 1;
}

/* The same with each row's max as its shift: every score first (S: [2][Lp / 16][16 rows][16 keys]), then each row's
 * max, then its exponentials. Q in tiles 0-3. The same bits as softmax_streamed where the two shifts agree. */
AMXBF16 static void softmax_exact(const uint16_t *kp, float *S, uint16_t *P, int64_t Lp, int64_t q0, int64_t rows,
                                  int64_t keys, float k2, float inv[QB]) {
    const __m512 vk = _mm512_set1_ps(k2);
    const int64_t kb32 = (keys + 31) / 32;
    for (int64_t kt = 0; kt < (keys + 15) / 16; kt++) score_tile(kp, kt, S + kt * 256, S + 16 * Lp + kt * 256);
    for (int64_t r = 0; r < QB; r++) {
        const float *s = S + (r >> 4) * 16 * Lp + (r & 15) * 16;  /* keys k .. k + 15 at s + 16 k */
        uint16_t *p = P + (r >> 4) * 16 * Lp + (r & 15) * 32;      /* keys k .. k + 31 at p + 16 k */
        const int64_t valid = r < rows ? q0 + r + 1 : 0;          /* keys this row sees (none: P's row zeros) */
        const float total = row_exp(s, p, valid, kb32, vk, valid ? -k2 * row_max(s, valid) : 0.0f);
        inv[r] = valid ? 1.0f / total : 0.0f;
    }
}

/* Rows q0 .. q0 + 31 of query head h: S, then P, then O (see above). Q: the rows' queries, copied (zeros past L). */
AMXBF16 static void attention_rows_amx(const uint16_t *qkv, uint16_t *out, const uint16_t *kp, const uint16_t *vp,
                                       int64_t b, int64_t h, int64_t q0, int64_t L, int64_t Lp, int64_t H, int64_t KV,
                                       float scale, uint8_t *scratch) {
    const int64_t NH = H + 2 * KV;
    float *S = (float *)scratch;                              /* [2][Lp / 16][16 rows][16 keys] fp32: tile by tile */
    uint16_t *P = (uint16_t *)(scratch + QB * Lp * 4);        /* [2][Lp / 32][16 rows][32 keys] bf16 */
    uint16_t *Q = P + QB * Lp;                                /* [32][D] bf16 */
    float *O = (float *)(Q + QB * D);                         /* [32][D] fp32 */
    const int64_t rows = L - q0 < QB ? L - q0 : QB, keys = q0 + rows;  /* keys 0 .. keys - 1: the last row's */
    if (rows == QB) {  /* the queries straight from qkv (a row every NH heads) */
        const uint16_t *q = qkv + ((b * L + q0) * NH + h) * D;
        _tile_loadd(0, q, NH * D * 2);                     /* rows 0-15, d 0..31 */
        _tile_loadd(1, q + 32, NH * D * 2);                /* d 32..63 */
        _tile_loadd(2, q + 16 * NH * D, NH * D * 2);       /* rows 16-31 */
        _tile_loadd(3, q + 16 * NH * D + 32, NH * D * 2);
    } else {  /* the last rows of a sequence: copied, zeros past L */
        for (int64_t r = 0; r < QB; r++) {
            if (r < rows) memcpy(Q + r * D, qkv + ((b * L + q0 + r) * NH + h) * D, D * 2);
            else memset(Q + r * D, 0, D * 2);
        }
        _tile_loadd(0, Q, D * 2);
        _tile_loadd(1, Q + 32, D * 2);
        _tile_loadd(2, Q + 16 * D, D * 2);
        _tile_loadd(3, Q + 16 * D + 32, D * 2);
    }
    const int64_t kb32 = (keys + 31) / 32;
    const float k2 = scale * 1.44269504088896341f;  /* the exponentials in base 2 */
    float inv[QB];
    if (!softmax_streamed(kp, S, P, Lp, rows, kb32, k2, inv)) softmax_exact(kp, S, P, Lp, q0, rows, keys, k2, inv);
    /* O = P V as two products of 32 rows by 32 columns (the 2 x 2 blocking of gemm_amx.c: each loaded tile in two
     * products) */
    for (int64_t c = 0; c < 2; c++) {
        _tile_zero(4);
        _tile_zero(5);
        _tile_zero(6);
        _tile_zero(7);
        for (int64_t kb = 0; kb < kb32; kb++) {
            const uint16_t *vb = vp + (kb * 4 + 2 * c) * 16 * 32;
            _tile_loadd(0, P + kb * 512, 64);
            _tile_loadd(2, vb, 64);
            _tile_dpbf16ps(4, 0, 2);
            _tile_loadd(3, vb + 16 * 32, 64);
            _tile_dpbf16ps(5, 0, 3);
            _tile_loadd(1, P + 16 * Lp + kb * 512, 64);
            _tile_dpbf16ps(6, 1, 2);
            _tile_dpbf16ps(7, 1, 3);
        }
        _tile_stored(4, O + 32 * c, D * 4);
        _tile_stored(5, O + 32 * c + 16, D * 4);
        _tile_stored(6, O + 16 * D + 32 * c, D * 4);
        _tile_stored(7, O + 16 * D + 32 * c + 16, D * 4);
    }
    for (int64_t r = 0; r < rows; r++) {
        uint16_t *dst = out + ((b * L + q0 + r) * H + h) * D;
        const __m512 vi = _mm512_set1_ps(inv[r]);
        for (int g = 0; g < D / 16; g++)
            _mm256_storeu_si256((__m256i *)(dst + 16 * g),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(O + r * D + 16 * g), vi)));
    }
}

/* task: (batch, key head, block of QB query rows), blocks of a (batch, key head) last first. The thread packs the
 * (batch, key head)'s keys and values into its own buffer (kp, in its scratch) at the first of its tasks it takes:
 * packed there, they stay in the core's L2 for its tasks (packing every (batch, key head) first, into one shared
 * buffer, had them come back from L3: attention 2.93 -> 2.50 ms a call at 8 x 512, 0.91 -> 0.82 at 8 x 256) */
AMXBF16 static inline void attention_task(const uint16_t *qkv, uint16_t *out, uint8_t *mine, int64_t *packed_bj,
                                          int64_t task, int64_t blocks, int64_t KV, int64_t group, int64_t L,
                                          int64_t Lp, int64_t H, float scale) {
    const int64_t c = blocks - 1 - task % blocks, bj = task / blocks, b = bj / KV, j = bj % KV;
    uint16_t *kp = (uint16_t *)mine, *vp = kp + Lp * D;
    if (bj != *packed_bj) {
        pack_kv_bf16(qkv, kp, vp, b, j, L, Lp, H, KV);
        *packed_bj = bj;
    }
    for (int64_t h = j * group; h < (j + 1) * group; h++)
        attention_rows_amx(qkv, out, kp, vp, b, h, c * QB, L, Lp, H, KV, scale, mine + packed_bytes(Lp));
}

/* qkv [B, L, H + 2 KV, D] bf16 -> out [B, L, H, D] bf16. scratch: threads * opd_attention_bf16_scratch_bytes(L),
 * 64-byte aligned. Returns 0 (nothing done) without the tile state. */
AMXBF16 int opd_causal_attention_bf16_amx(const uint16_t *qkv, uint16_t *out, uint8_t *scratch, int64_t B, int64_t L,
                                          int64_t H, int64_t KV, float scale, int threads) {
    if (!att_amx_granted) return 0;
    const int64_t Lp = (L + 31) & ~(int64_t)31, group = H / KV, blocks = (L + QB - 1) / QB;
    const int64_t per_thread = opd_attention_bf16_scratch_bytes(L);
    #pragma omp parallel num_threads(threads)
    {
        tile_config_16x64();
#ifdef _OPENMP
        uint8_t *mine = scratch + per_thread * omp_get_thread_num();
        const int64_t nthreads = omp_get_num_threads();
#else
        uint8_t *mine = scratch;
        const int64_t nthreads = 1;
#endif
        int64_t packed_bj = -1;
        /* the tasks of one (batch, key head) in a row (its packed keys and values stay in the caches); within it,
         * the last blocks (the longest rows) first. Where the threads can take whole sequences each (B a multiple
         * of them), thread t takes the t-th share of the batch, the rows the products before and after
         * (gemm_amx.c) give it: the QKV rows it reads and the output rows it writes stay in its own core's caches
         * (dynamic scheduling handed half of them to the other core: attention 45 -> 40 ms, the o product 0.7 ms
         * less, of the 8 x 256 forward). Dynamic scheduling, where B is not, has both threads on each (batch, key
         * head), and each packs it. */
        if (B % nthreads == 0) {
            #pragma omp for schedule(static)
            for (int64_t task = 0; task < B * KV * blocks; task++)
                attention_task(qkv, out, mine, &packed_bj, task, blocks, KV, group, L, Lp, H, scale);
        } else {
            #pragma omp for schedule(dynamic, 1)
            for (int64_t task = 0; task < B * KV * blocks; task++)
                attention_task(qkv, out, mine, &packed_bj, task, blocks, KV, group, L, Lp, H, scale);
        }
        _tile_release();
    }
    return 1;
}
