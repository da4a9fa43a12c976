/* The update's full-vocabulary terms (opd.objectives.fused.TokenTerms) row by row: from the LM head's logits
 * (bf16 or fp32) and the teacher's log-probs (fp32, or none), the sampled token's logprob, the entropy, the reverse
 * KL(student || teacher) and the row's log-sum-exp; and the gradient of the logits. torch's ops make ~10 passes over
 * each block of rows, each at this host's elementwise rate; here a row (49k values, ~300 KB with the teacher's) is
 * read from memory once and then worked on in L2 (bench/NOTES.md, session 14).
 *
 * With z = logits / T, m = max z, e = exp(z - m), S = sum e, lse = m + log S, logp = z - lse, p = e / S:
 *   tok = logp[target]     ent = -sum p logp     kl = sum p (logp - t)
 *   d/dz: p (g_kl (logp - t - kl) - g_tok) + g_tok onehot(target), each / T
 * the same formulas as the torch ops, evaluated in the same order per element. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "exp_poly.h"
#include "simd.h"

/* one row of logits as fp32 z = logits / T (scale = 1 / T) into z */
static void load_row(const void *logits, int bf16, int64_t row, int64_t V, float scale, float *z) {
    if (bf16) {
        const uint16_t *l = (const uint16_t *)logits + row * V;
        #pragma omp simd
        for (int64_t i = 0; i < V; i++) z[i] = bf16_to_fp32(l[i]) * scale;
    } else {
        const float *l = (const float *)logits + row * V;
        #pragma omp simd
        for (int64_t i = 0; i < V; i++) z[i] = l[i] * scale;
    }
}

/* ---- AVX-512F versions of the exp-bound loops (16 lanes where the AVX2 build has 8), chosen at run time
 * (opd_vocab_terms_set_wide, from opd.cpu_kernels where the CPU has AVX-512F): the same formulas, the sums in
 * another order (results within fp32 rounding of the AVX2 build's) */
#define WIDE __attribute__((target("avx512f")))
static int wide = 0;

void opd_vocab_terms_set_wide(int on) { wide = on; }
int opd_vocab_terms_wide(void) { return wide; }

WIDE static float normalise16(float *z, float *p, int64_t V) {
    const int64_t V16 = V & ~(int64_t)15;
    __m512 mv = _mm512_set1_ps(-INFINITY);
    for (int64_t i = 0; i < V16; i += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(z + i));
    float m = _mm512_reduce_max_ps(mv);
    for (int64_t i = V16; i < V; i++) m = z[i] > m ? z[i] : m;
    __m512 acc = _mm512_setzero_ps();
    const __m512 vm = _mm512_set1_ps(m);
    for (int64_t i = 0; i < V16; i += 16) {
        const __m512 e = exp16_scalef(_mm512_sub_ps(_mm512_loadu_ps(z + i), vm));
        _mm512_storeu_ps(p + i, e);
        acc = _mm512_add_ps(acc, e);
    }
    float s = _mm512_reduce_add_ps(acc);
    for (int64_t i = V16; i < V; i++) {
        p[i] = exp_poly(z[i] - m);
        s += p[i];
    }
    const float log_s = logf(s), inv_s = 1.0f / s;
    const __m512 vl = _mm512_set1_ps(log_s), vi = _mm512_set1_ps(inv_s);
    for (int64_t i = 0; i < V16; i += 16) {
        _mm512_storeu_ps(z + i, _mm512_sub_ps(_mm512_sub_ps(_mm512_loadu_ps(z + i), vm), vl));
        _mm512_storeu_ps(p + i, _mm512_mul_ps(_mm512_loadu_ps(p + i), vi));
    }
    for (int64_t i = V16; i < V; i++) {
        z[i] = (z[i] - m) - log_s;
        p[i] *= inv_s;
    }
    return m + log_s;
}

/* backward_row8 (below) in 16 lanes */
WIDE static void backward_row16(float *g, const float *t, int64_t V, float l, float gt, float gk, float k) {
    const int64_t V16 = V & ~(int64_t)15;
    const __m512 vl = _mm512_set1_ps(l), vgt = _mm512_set1_ps(gt), vgk = _mm512_set1_ps(gk), vk = _mm512_set1_ps(k);
    if (t) {
        for (int64_t i = 0; i < V16; i += 16) {
            const __m512 logp = _mm512_sub_ps(_mm512_loadu_ps(g + i), vl);
            const __m512 d = _mm512_sub_ps(_mm512_sub_ps(logp, _mm512_loadu_ps(t + i)), vk);
            _mm512_storeu_ps(g + i, _mm512_mul_ps(_mm512_fmsub_ps(vgk, d, vgt), exp16_scalef(logp)));
        }
        for (int64_t i = V16; i < V; i++) {
            const float logp = g[i] - l;
            g[i] = (gk * ((logp - t[i]) - k) - gt) * exp_poly(logp);
        }
    } else {
        const __m512 neg = _mm512_set1_ps(-gt);
        for (int64_t i = 0; i < V16; i += 16)
            _mm512_storeu_ps(g + i, _mm512_mul_ps(neg, exp16_scalef(_mm512_sub_ps(_mm512_loadu_ps(g + i), vl))));
        for (int64_t i = V16; i < V; i++) g[i] = -gt * exp_poly(g[i] - l);
    }
}

/* z -> logp = z - lse in place, e -> p; returns lse */
static float normalise(float *z, float *p, int64_t V) {
    if (wide) return normalise16(z, p, V);
    float m = -INFINITY;
    #pragma omp simd reduction(max : m)
    for (int64_t i = 0; i < V; i++) m = z[i] > m ? z[i] : m;
    const int64_t V8 = V & ~(int64_t)7;
    __m256 acc = _mm256_setzero_ps();
    const __m256 vm = _mm256_set1_ps(m);
    for (int64_t i = 0; i < V8; i += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(z + i), vm));
        _mm256_storeu_ps(p + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    float s = hsum(acc);
    for (int64_t i = V8; i < V; i++) {
        p[i] = exp_poly(z[i] - m);
        s += p[i];
    }
    const float log_s = logf(s), inv_s = 1.0f / s;
    #pragma omp simd
    for (int64_t i = 0; i < V; i++) {
        z[i] = (z[i] - m) - log_s;
        p[i] *= inv_s;
    }
    return m + log_s;
}

/* ---- Without a teacher the forward needs only the log-sum-exp, the token's logprob and the entropy. With
 * m = max z, e = exp(z - m), s = sum e and u = sum e (z - m):  lse = m + log s,  ent = -sum p logp = log s - u / s.
 * Two passes over the row as it is (bf16 or fp32; the max, then the exponentials), nothing written: the path with
 * a teacher upcasts the row into scratch and makes five (teacher scoring and objectives without a distribution
 * take this one). */
static inline float z_at(const void *logits, int bf16, int64_t i, float scale) {
    return (bf16 ? bf16_to_fp32(((const uint16_t *)logits)[i]) : ((const float *)logits)[i]) * scale;
}

WIDE static inline __m512 load_z16(const void *logits, int bf16, int64_t i, __m512 scale) {
    const __m512 v = bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)logits + i))), 16))
                          : _mm512_loadu_ps((const float *)logits + i);
    return _mm512_mul_ps(v, scale);
}

WIDE static float max_sum16(const void *row, int bf16, int64_t V, float scale, float *s_out, float *u_out) {
    const int64_t V16 = V & ~(int64_t)15;
    const __m512 vs = _mm512_set1_ps(scale);
    __m512 mv = _mm512_set1_ps(-INFINITY);
    for (int64_t i = 0; i < V16; i += 16) mv = _mm512_max_ps(mv, load_z16(row, bf16, i, vs));
    float m = _mm512_reduce_max_ps(mv);
    for (int64_t i = V16; i < V; i++) { const float z = z_at(row, bf16, i, scale); m = z > m ? z : m; }
    const __m512 vm = _mm512_set1_ps(m);
    __m512 sa = _mm512_setzero_ps(), ua = _mm512_setzero_ps(), sb = _mm512_setzero_ps(), ub = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= V16; i += 32) {  /* two vectors an iteration, each into its own sums */
        const __m512 da = _mm512_sub_ps(load_z16(row, bf16, i, vs), vm), db = _mm512_sub_ps(load_z16(row, bf16, i + 16, vs), vm);
        const __m512 ea = exp16_scalef(da), eb = exp16_scalef(db);
        sa = _mm512_add_ps(sa, ea);
        sb = _mm512_add_ps(sb, eb);
        ua = _mm512_fmadd_ps(ea, da, ua);
        ub = _mm512_fmadd_ps(eb, db, ub);
    }
    for (; i < V16; i += 16) {
        const __m512 d = _mm512_sub_ps(load_z16(row, bf16, i, vs), vm), e = exp16_scalef(d);
        sa = _mm512_add_ps(sa, e);
        ua = _mm512_fmadd_ps(e, d, ua);
    }
    float s = _mm512_reduce_add_ps(_mm512_add_ps(sa, sb)), u = _mm512_reduce_add_ps(_mm512_add_ps(ua, ub));
    for (int64_t j = V16; j < V; j++) {
        const float d = z_at(row, bf16, j, scale) - m, e = exp_poly(d);
        s += e;
        u += e * d;
    }
    *s_out = s;
    *u_out = u;
    return m;
}

static float max_sum8(const void *row, int bf16, int64_t V, float scale, float *s_out, float *u_out) {
    const int64_t V8 = V & ~(int64_t)7;
    const __m256 vs = _mm256_set1_ps(scale);
#define LOAD_Z8(i) _mm256_mul_ps(bf16 ? bf16x8_to_fp32((const uint16_t *)row + (i)) : _mm256_loadu_ps((const float *)row + (i)), vs)
    __m256 mv = _mm256_set1_ps(-INFINITY);
    for (int64_t i = 0; i < V8; i += 8) mv = _mm256_max_ps(mv, LOAD_Z8(i));
    float lanes[8], m = -INFINITY;
    _mm256_storeu_ps(lanes, mv);
    for (int k = 0; k < 8; k++) m = lanes[k] > m ? lanes[k] : m;
    for (int64_t i = V8; i < V; i++) { const float z = z_at(row, bf16, i, scale); m = z > m ? z : m; }
    const __m256 vm = _mm256_set1_ps(m);
    __m256 sa = _mm256_setzero_ps(), ua = _mm256_setzero_ps();
    for (int64_t i = 0; i < V8; i += 8) {
        const __m256 d = _mm256_sub_ps(LOAD_Z8(i), vm), e = exp8(d);
        sa = _mm256_add_ps(sa, e);
        ua = _mm256_fmadd_ps(e, d, ua);
    }
#undef LOAD_Z8
    float s = hsum(sa), u = hsum(ua);
    for (int64_t j = V8; j < V; j++) {
        const float d = z_at(row, bf16, j, scale) - m, e = exp_poly(d);
        s += e;
        u += e * d;
    }
    *s_out = s;
    *u_out = u;
    return m;
}

static void no_teacher_terms(const void *logits, int bf16, const int64_t *targets, int64_t n, int64_t V, float inv_t,
                             float *tok, float *ent, float *kl, float *lse, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < n; r++) {
        const void *row = bf16 ? (const void *)((const uint16_t *)logits + r * V) : (const void *)((const float *)logits + r * V);
        float s, u;
        const float m = wide ? max_sum16(row, bf16, V, inv_t, &s, &u) : max_sum8(row, bf16, V, inv_t, &s, &u);
        const float log_s = logf(s);
        lse[r] = m + log_s;
        tok[r] = (z_at(row, bf16, targets[r], inv_t) - m) - log_s;
        ent[r] = log_s - u / s;
        kl[r] = 0.0f;
    }
}

/* teacher_rows (or NULL: row r): row r's teacher log-probs are row teacher_rows[r] of `teacher`, so the caller can
 * hand over the teacher's whole [batch x length, V] block and the positions of the real tokens in it instead of a
 * gathered copy (50 MB at batch 4 x 64 tokens and a 49k vocabulary).
 * scratch: 2 * V floats per thread (threads * 2 * V in all) */
void opd_vocab_terms_forward(const void *logits, int bf16, const float *teacher, const int64_t *teacher_rows,
                             const int64_t *targets, int64_t n, int64_t V, float inv_t, float *tok, float *ent, float *kl, float *lse, float *scratch,
                             int threads) {
    if (!teacher) {
        no_teacher_terms(logits, bf16, targets, n, V, inv_t, tok, ent, kl, lse, threads);
        return;
    }
    #pragma omp parallel num_threads(threads)
    {
        float *z = thread_part(scratch, 2 * V * (int64_t)sizeof(float));
        float *p = z + V;
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) {
            load_row(logits, bf16, r, V, inv_t, z);
            lse[r] = normalise(z, p, V);
            tok[r] = z[targets[r]];
            float h = 0.0f, d = 0.0f;
            const float *t = teacher ? teacher + (teacher_rows ? teacher_rows[r] : r) * V : NULL;
            #pragma omp simd reduction(+ : h)
            for (int64_t i = 0; i < V; i++) h += p[i] * z[i];
            if (t) {
                #pragma omp simd reduction(+ : d)
                for (int64_t i = 0; i < V; i++) d += p[i] * (z[i] - t[i]);
            }
            ent[r] = -h;
            kl[r] = d;
        }
    }
}

/* the backward's row in 8 lanes (AVX2): g holds z on entry, dz before the 1 / T and the target's + g_tok on return */
static void backward_row8(float *g, const float *t, int64_t V, float l, float gt, float gk, float k) {
    const int64_t V8 = V & ~(int64_t)7;
    const __m256 vl = _mm256_set1_ps(l), vgt = _mm256_set1_ps(gt), vgk = _mm256_set1_ps(gk), vk = _mm256_set1_ps(k);
    if (t) {
        for (int64_t i = 0; i < V8; i += 8) {
            const __m256 logp = _mm256_sub_ps(_mm256_loadu_ps(g + i), vl);
            const __m256 d = _mm256_sub_ps(_mm256_sub_ps(logp, _mm256_loadu_ps(t + i)), vk);
            _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_fmsub_ps(vgk, d, vgt), exp8(logp)));
        }
        for (int64_t i = V8; i < V; i++) {
            const float logp = g[i] - l;
            g[i] = (gk * ((logp - t[i]) - k) - gt) * exp_poly(logp);
        }
    } else {
        const __m256 neg = _mm256_set1_ps(-gt);
        for (int64_t i = 0; i < V8; i += 8)
            _mm256_storeu_ps(g + i, _mm256_mul_ps(neg, exp8(_mm256_sub_ps(_mm256_loadu_ps(g + i), vl))));
        for (int64_t i = V8; i < V; i++) g[i] = -gt * exp_poly(g[i] - l);
    }
}

void opd_vocab_terms_backward(const void *logits, int bf16, const float *teacher, const int64_t *teacher_rows,
                              const int64_t *targets, int64_t n, int64_t V, float inv_t, const float *lse, const float *kl, const float *g_tok,
                              const float *g_kl, void *grad, float *scratch, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        float *g = thread_part(scratch, 2 * V * (int64_t)sizeof(float));
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) {
            load_row(logits, bf16, r, V, inv_t, g);
            const float l = lse[r], gt = g_tok[r], gk = g_kl ? g_kl[r] : 0.0f, k = kl[r];
            const float *t = teacher ? teacher + (teacher_rows ? teacher_rows[r] : r) * V : NULL;
            if (wide)
                backward_row16(g, t, V, l, gt, gk, k);
            else
                backward_row8(g, t, V, l, gt, gk, k);
            g[targets[r]] += gt;
            if (bf16) {
                uint16_t *out = (uint16_t *)grad + r * V;
                #pragma omp simd
                for (int64_t i = 0; i < V; i++) out[i] = fp32_to_bf16(g[i] * inv_t);
            } else {
                float *out = (float *)grad + r * V;
                #pragma omp simd
                for (int64_t i = 0; i < V; i++) out[i] = g[i] * inv_t;
            }
        }
    }
}

/* The teacher's side: log_softmax(logits / T) of each row r written to row out_rows[r] (or r, where out_rows is
 * NULL) of logp (fp32 [*, V]: the scores' [batch x length, V] block itself, no copy scattered into it after), with
 * the token's logprob and the entropy (scratch: V floats per thread). */
void opd_log_softmax_rows(const void *logits, int bf16, const int64_t *targets, int64_t n, int64_t V, float inv_t,
                          float *logp, const int64_t *out_rows, float *tok, float *ent, float *scratch, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        float *p = thread_part(scratch, V * (int64_t)sizeof(float));
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) {
            float *z = logp + (out_rows ? out_rows[r] : r) * V;
            load_row(logits, bf16, r, V, inv_t, z);
            normalise(z, p, V);
            tok[r] = z[targets[r]];
            float h = 0.0f;
            #pragma omp simd reduction(+ : h)
            for (int64_t i = 0; i < V; i++) h += p[i] * z[i];
            ent[r] = -h;
        }
    }
}
