/* One whole decode step of a Llama-architecture model with int8 weights, every layer in one call
 * (opd.rollout.fast_llama, rollout.dtype = "int8" where opd's int8 kernel takes fp32 activations).
 *
 * Why: at batch 4 a decode step of the half-depth SmolLM2 student is ~600 small torch ops (norms, RoPE, cache
 * writes, attention, SiLU, casts, views) around 61 int8 products; each op costs microseconds of dispatch for a
 * few thousand elements, and together they took about as long as the products themselves (bench/NOTES.md,
 * session 12). Here the same arithmetic runs straight through: RMSNorm, the fused QKV product, RoPE, the cache
 * write, grouped-query attention over the cached positions the mask allows, the output product, the SiLU-gated
 * MLP, the final norm and the LM head. All in fp32 (the products as the build of int8_gemv.c in use computes them:
 * exact fp32, or int16-rounded activations in the VNNI build); the KV cache is
 * the decoder's own fp32 tensor [layers, 2, cache_batch, kv_heads, max_len, head_dim], so the prefill (torch)
 * and these steps share it. */
#include "int8_gemv.c"
#include <math.h>
#include <string.h>

/* an int8 product with opd_int8_gemv's arguments: the build opd.cpu_kernels chose for this process */
typedef void (*Gemv)(const float *, int, const int8_t *, const float *, float *, int64_t, int64_t, int);

typedef struct {
    int64_t batch, hidden, heads, kv_heads, head_dim, inter, layers, vocab;
    float eps, scale;
    /* per layer (arrays of `layers` pointers): int8 weights and their fp32 per-channel scales, fp32 norms */
    const int8_t *const *qkv_q;
    const float *const *qkv_s;
    const int8_t *const *o_q;
    const float *const *o_s;
    const int8_t *const *gu_q;  /* gate rows [0, inter), up rows [inter, 2 inter) */
    const float *const *gu_s;
    const int8_t *const *down_q;
    const float *const *down_s;
    const float *const *in_norm;
    const float *const *post_norm;
    const float *final_norm;
    const int8_t *head_q;
    const float *head_s;
    const void *embed; /* [vocab, hidden], fp32 or bf16 (embed_bf16) */
    int64_t embed_bf16;
    float *cache; /* fp32 [layers, 2, cache_batch, kv_heads, max_len, head_dim] */
    int64_t cache_batch, max_len;
    const float *cos, *sin; /* [max_len, head_dim] */
    /* this step */
    const int64_t *tokens;    /* [batch] */
    const int64_t *positions; /* positions[b * pos_stride] */
    int64_t pos_stride;
    const int64_t *mask; /* mask[b * mask_stride + j] != 0: row b attends cache position j (j <= start) */
    int64_t mask_stride;
    int64_t start;  /* the cache position this step writes */
    float *scratch; /* opd_decode_scratch_floats() floats */
    float *logits;  /* [batch, vocab] */
    int64_t threads;
    Gemv gemv;
} DecodeStep;

int64_t opd_decode_scratch_floats(int64_t batch, int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim,
                                  int64_t inter, int64_t max_len) {
    return batch * (2 * hidden + (heads + 2 * kv_heads) * head_dim + heads * head_dim + 3 * inter + heads * max_len);
}

#include "exp_poly.h"

static void rms_norm(const float *x, const float *w, float *y, int64_t rows, int64_t n, float eps) {
    for (int64_t b = 0; b < rows; b++) {
        const float *xb = x + b * n;
        float *yb = y + b * n, ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < n; i++) ss += xb[i] * xb[i];
        const float r = 1.0f / sqrtf(ss / (float)n + eps);
#pragma omp simd
        for (int64_t i = 0; i < n; i++) yb[i] = xb[i] * r * w[i];
    }
}

static void gemv(const DecodeStep *a, const float *x, const int8_t *q, const float *s, float *y, int64_t N, int64_t K) {
    a->gemv(x, (int)a->batch, q, s, y, N, K, (int)a->threads);
}

/* RoPE of one head vector in place: y = x cos + rotate_half(x) sin, rotate_half(x) = (-x[half:], x[:half]). */
static void rope(float *v, const float *c, const float *s, int64_t D) {
    const int64_t half = D / 2;
    for (int64_t i = 0; i < half; i++) {
        const float lo = v[i], hi = v[i + half];
        v[i] = lo * c[i] + (-hi) * s[i];
        v[i + half] = hi * c[i + half] + lo * s[i + half];
    }
}


/* the attention's AVX-512F loop: the CPU's flag on the first step, unless set before (opd.cpu_kernels sets it off
 * with the AVX2 build of the products, so that build runs AVX2 code only and its tests reach the AVX2 form) */
static int wide = -1;

void opd_decode_set_wide(int on) { wide = on; }

/* One (row, key/value head) of the step's attention: the H / KV query heads that read that head, over the cached
 * positions [0, end) the row's mask allows, as torch's scaled_dot_product_attention(enable_gqa=True). Each cached
 * key and value is loaded once for the whole group, whose queries and outputs stay in registers (head size 64, up
 * to 4 query heads a group: SmolLM2's 64 and 3); masked positions get a weight of exactly 0. */
#define GROUP16 4
__attribute__((target("avx512f"))) static void attend_group16(const float *q, int64_t group, const float *K,
                                                              const float *V, const int64_t *m, int64_t end,
                                                              float scale, float *sc, int64_t ML, float *o) {
    __m512 qv[GROUP16][4], acc[GROUP16][4];
    float top[GROUP16];
#pragma GCC unroll 4
    for (int j = 0; j < GROUP16; j++) {
        top[j] = -INFINITY;
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) {
            qv[j][c] = j < group ? _mm512_loadu_ps(q + j * 64 + 16 * c) : _mm512_setzero_ps();
            acc[j][c] = _mm512_setzero_ps();
        }
    }
    for (int64_t t = 0; t < end; t++) {
        if (!m[t]) continue;
        const __m512 k0 = _mm512_loadu_ps(K + t * 64), k1 = _mm512_loadu_ps(K + t * 64 + 16),
                     k2 = _mm512_loadu_ps(K + t * 64 + 32), k3 = _mm512_loadu_ps(K + t * 64 + 48);
#pragma GCC unroll 4
        for (int j = 0; j < GROUP16; j++) {
            if (j < group) {
                const __m512 d = _mm512_fmadd_ps(qv[j][0], k0, _mm512_fmadd_ps(qv[j][1], k1,
                                 _mm512_fmadd_ps(qv[j][2], k2, _mm512_mul_ps(qv[j][3], k3))));
                const float v = _mm512_reduce_add_ps(d) * scale;
                sc[j * ML + t] = v;
                top[j] = v > top[j] ? v : top[j];
            }
        }
    }
    float inv[GROUP16];
    for (int64_t j = 0; j < group; j++) {
        float *s = sc + j * ML, sum = 0.0f;
        const __m512 tv = _mm512_set1_ps(top[j]);
        __m512 total = _mm512_setzero_ps();
        int64_t t = 0;
        for (; t + 16 <= end; t += 16) {
            const __mmask16 keep = _mm512_cmpneq_epi64_mask(_mm512_loadu_si512(m + t), _mm512_setzero_si512()) |
                                   ((__mmask16)_mm512_cmpneq_epi64_mask(_mm512_loadu_si512(m + t + 8), _mm512_setzero_si512()) << 8);
            const __m512 e = _mm512_maskz_mov_ps(keep, exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t), tv)));
            _mm512_storeu_ps(s + t, e);
            total = _mm512_add_ps(total, e);
        }
        sum = _mm512_reduce_add_ps(total);
        for (; t < end; t++) {
            s[t] = m[t] ? exp_poly(s[t] - top[j]) : 0.0f;
            sum += s[t];
        }
        inv[j] = sum > 0.0f ? 1.0f / sum : 0.0f;
    }
    for (int64_t t = 0; t < end; t++) {
        if (!m[t]) continue;
        const __m512 v0 = _mm512_loadu_ps(V + t * 64), v1 = _mm512_loadu_ps(V + t * 64 + 16),
                     v2 = _mm512_loadu_ps(V + t * 64 + 32), v3 = _mm512_loadu_ps(V + t * 64 + 48);
#pragma GCC unroll 4
        for (int j = 0; j < GROUP16; j++) {
            if (j < group) {
                const __m512 w = _mm512_set1_ps(sc[j * ML + t]);
                acc[j][0] = _mm512_fmadd_ps(w, v0, acc[j][0]);
                acc[j][1] = _mm512_fmadd_ps(w, v1, acc[j][1]);
                acc[j][2] = _mm512_fmadd_ps(w, v2, acc[j][2]);
                acc[j][3] = _mm512_fmadd_ps(w, v3, acc[j][3]);
            }
        }
    }
#pragma GCC unroll 4
    for (int j = 0; j < GROUP16; j++) {
        if (j < group) {
            const __m512 w = _mm512_set1_ps(inv[j]);
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) _mm512_storeu_ps(o + j * 64 + 16 * c, _mm512_mul_ps(acc[j][c], w));
        }
    }
}

/* the same arithmetic one query head at a time, for CPUs without AVX-512F, head sizes other than 64 or groups of
 * more than GROUP16 query heads */
static void attend_group(const float *q, int64_t group, const float *K, const float *V, const int64_t *m, int64_t end,
                         int64_t D, float scale, float *sc, int64_t ML, float *o) {
    for (int64_t j = 0; j < group; j++) {
        const float *qj = q + j * D;
        float *s = sc + j * ML, *oj = o + j * D, top = -INFINITY, sum = 0.0f;
        for (int64_t t = 0; t < end; t++) {
            if (!m[t]) continue;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < D; d++) dot += qj[d] * K[t * D + d];
            s[t] = dot * scale;
            top = s[t] > top ? s[t] : top;
        }
        for (int64_t t = 0; t < end; t++) {
            s[t] = m[t] ? exp_poly(s[t] - top) : 0.0f;
            sum += s[t];
        }
        for (int64_t d = 0; d < D; d++) oj[d] = 0.0f;
        for (int64_t t = 0; t < end; t++) {
            if (s[t] == 0.0f) continue;
            const float w = s[t] / sum;
#pragma omp simd
            for (int64_t d = 0; d < D; d++) oj[d] += w * V[t * D + d];
        }
    }
}

/* this step's attention for every row and key/value head (cache layout [cache_batch, kv_heads, max_len, D]) */
static void attention(const DecodeStep *a, const float *qkv, const float *keys, const float *values, float *scores,
                      float *att) {
    const int64_t B = a->batch, H = a->heads, KV = a->kv_heads, D = a->head_dim, ML = a->max_len, end = a->start + 1;
    const int64_t QKV = (H + 2 * KV) * D, group = H / KV;
    const int vec = wide && D == 64 && group <= GROUP16;
#pragma omp parallel for schedule(static) num_threads((int)a->threads)
    for (int64_t bg = 0; bg < B * KV; bg++) {
        const int64_t b = bg / KV, g = bg % KV;
        const float *q = qkv + b * QKV + g * group * D, *K = keys + (b * KV + g) * ML * D, *V = values + (b * KV + g) * ML * D;
        const int64_t *m = a->mask + b * a->mask_stride;
        float *sc = scores + (b * H + g * group) * ML, *o = att + b * H * D + g * group * D;
        if (vec) attend_group16(q, group, K, V, m, end, a->scale, sc, ML, o);
        else attend_group(q, group, K, V, m, end, D, a->scale, sc, ML, o);
    }
}

void opd_decode_step(const DecodeStep *a) {
    if (wide < 0) wide = __builtin_cpu_supports("avx512f");
    const int64_t B = a->batch, E = a->hidden, H = a->heads, KV = a->kv_heads, D = a->head_dim, I = a->inter;
    const int64_t QKV = (H + 2 * KV) * D, ML = a->max_len, CB = a->cache_batch;
    float *x = a->scratch, *h = x + B * E, *qkv = h + B * E, *att = qkv + B * QKV, *gu = att + B * H * D,
          *act = gu + B * 2 * I, *scores = act + B * I;

    for (int64_t b = 0; b < B; b++) { /* the embedding rows of this step's tokens, in fp32 */
        const int64_t t = a->tokens[b];
        if (a->embed_bf16) {
            const uint16_t *e = (const uint16_t *)a->embed + t * E;
            for (int64_t i = 0; i < E; i++) {
                union { uint32_t u; float f; } v;
                v.u = (uint32_t)e[i] << 16;
                x[b * E + i] = v.f;
            }
        } else {
            memcpy(x + b * E, (const float *)a->embed + t * E, E * sizeof(float));
        }
    }
    for (int64_t l = 0; l < a->layers; l++) {
        rms_norm(x, a->in_norm[l], h, B, E, a->eps);
        gemv(a, h, a->qkv_q[l], a->qkv_s[l], qkv, QKV, E);
        float *keys = a->cache + (l * 2 + 0) * CB * KV * ML * D, *values = a->cache + (l * 2 + 1) * CB * KV * ML * D;
        for (int64_t b = 0; b < B; b++) { /* rotate this row's queries and keys, append its key and value */
            const int64_t p = a->positions[b * a->pos_stride];
            const float *c = a->cos + p * D, *s = a->sin + p * D;
            float *row = qkv + b * QKV;
            for (int64_t j = 0; j < H + KV; j++) rope(row + j * D, c, s, D);
            for (int64_t g = 0; g < KV; g++) {
                memcpy(keys + ((b * KV + g) * ML + a->start) * D, row + (H + g) * D, D * sizeof(float));
                memcpy(values + ((b * KV + g) * ML + a->start) * D, row + (H + KV + g) * D, D * sizeof(float));
            }
        }
        attention(a, qkv, keys, values, scores, att);
        gemv(a, att, a->o_q[l], a->o_s[l], h, E, H * D);
        for (int64_t i = 0; i < B * E; i++) x[i] += h[i];
        rms_norm(x, a->post_norm[l], h, B, E, a->eps);
        gemv(a, h, a->gu_q[l], a->gu_s[l], gu, 2 * I, E);
        for (int64_t b = 0; b < B; b++) silu_mul_row8(gu + b * 2 * I, gu + b * 2 * I + I, act + b * I, I);
        gemv(a, act, a->down_q[l], a->down_s[l], h, E, I);
        for (int64_t i = 0; i < B * E; i++) x[i] += h[i];
    }
    rms_norm(x, a->final_norm, h, B, E, a->eps);
    gemv(a, h, a->head_q, a->head_s, a->logits, a->vocab, E);
}
