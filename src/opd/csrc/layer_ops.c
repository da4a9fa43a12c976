/* The elementwise steps of a bf16 Llama layer's forward without grad (opd.llama: the teacher's scoring forward and
 * the rollout's prefill), one pass each where torch makes two to four passes at bf16's slow elementwise rate on the
 * CPU (bench/NOTES.md, session 14). Each rounds to bf16 where the torch ops it replaces do, so the results are
 * those of the torch ops up to the last bit of the fp32 arithmetic in between:
 *   rms_norm:  y = bf16(w * bf16(x * rsqrt(mean(x^2) + eps)))        (opd.llama.rms_norm on bf16)
 *   rope:      x = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin))  in place, per row at its position
 *   silu_mul:  y = bf16(bf16(silu(gate)) * up)                      (F.silu(gate) * up; AVX-512 BF16 only)
 * AVX2 + FMA, and AVX-512 BF16 builds below; rows in parallel on torch's OpenMP threads. The same three steps in
 * fp32 are at the end of the file (session 15). */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "bf16.h"
#include "bf16_avx512.h"
#include "exp_poly.h"
#include "simd.h"

static void rope_tail(uint16_t *v, const uint16_t *c, const uint16_t *s, int64_t half, int64_t from) {
    for (int64_t i = from; i < half; i++) {
        const float a = bf16_to_fp32(v[i]), b = bf16_to_fp32(v[half + i]);
        const float lo = bf16_to_fp32(fp32_to_bf16(a * bf16_to_fp32(c[i])))
                       + bf16_to_fp32(fp32_to_bf16(-b * bf16_to_fp32(s[i])));
        const float hi = bf16_to_fp32(fp32_to_bf16(b * bf16_to_fp32(c[half + i])))
                       + bf16_to_fp32(fp32_to_bf16(a * bf16_to_fp32(s[half + i])));
        v[i] = fp32_to_bf16(lo);
        v[half + i] = fp32_to_bf16(hi);
    }
}

void opd_rms_norm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t rows, int64_t n, float eps,
                       int threads) {
    const int64_t n8 = n & ~(int64_t)7;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * n;
        uint16_t *yr = y + r * n;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t i = 0; i < n8; i += 8) {
            const __m256 v = bf16x8_to_fp32(xr + i);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        float ss = hsum(acc);
        for (int64_t i = n8; i < n; i++) ss += bf16_to_fp32(xr[i]) * bf16_to_fp32(xr[i]);
        const float inv = 1.0f / sqrtf(ss / (float)n + eps);
        const __m256 vinv = _mm256_set1_ps(inv);
        for (int64_t i = 0; i < n8; i += 8) {
            const __m256 normed = round_bf16x8(_mm256_mul_ps(bf16x8_to_fp32(xr + i), vinv));
            _mm_storeu_si128((__m128i *)(yr + i), fp32x8_to_bf16(_mm256_mul_ps(bf16x8_to_fp32(w + i), normed)));
        }
        rms_norm_tail(xr, w, yr, inv, n8, n);
    }
}

/* x: rows of `stride` values; the first `heads` heads of D values each are rotated, row r at positions[r]
 * (cos / sin: [max position + 1, D] tables, bf16). D even. */
void opd_rope_bf16(uint16_t *x, int64_t rows, int64_t stride, int64_t heads, int64_t D, const uint16_t *cos,
                   const uint16_t *sin, const int64_t *positions, int threads) {
    const int64_t half = D / 2, h8 = half & ~(int64_t)7;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *c = cos + positions[r] * D, *s = sin + positions[r] * D;
        for (int64_t h = 0; h < heads; h++) {
            uint16_t *v = x + r * stride + h * D;
            for (int64_t i = 0; i < h8; i += 8) {
                const __m256 a = bf16x8_to_fp32(v + i), b = bf16x8_to_fp32(v + half + i);
                /* rotate_half(x) = cat(-x2, x1): the first half pairs with -b, the second with a */
                const __m256 lo = _mm256_add_ps(round_bf16x8(_mm256_mul_ps(a, bf16x8_to_fp32(c + i))),
                                                round_bf16x8(_mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), b),
                                                                           bf16x8_to_fp32(s + i))));
                const __m256 hi = _mm256_add_ps(round_bf16x8(_mm256_mul_ps(b, bf16x8_to_fp32(c + half + i))),
                                                round_bf16x8(_mm256_mul_ps(a, bf16x8_to_fp32(s + half + i))));
                _mm_storeu_si128((__m128i *)(v + i), fp32x8_to_bf16(lo));
                _mm_storeu_si128((__m128i *)(v + half + i), fp32x8_to_bf16(hi));
            }
            rope_tail(v, c, s, half, h8);
        }
    }
}

/* ---- the same for CPUs with AVX-512 BF16 (Cooper Lake / Sapphire Rapids and later, Zen 4 and later): 16 lanes,
 * and the hardware's round-to-nearest-even conversion to bf16 (vcvtneps2bf16) instead of ~10 integer instructions
 * per 8 values; the same results for every non-NaN value. SiLU * up only here: emulating its three roundings on
 * AVX2 ran slower than torch's own op (bench/NOTES.md, session 14). The row helpers: bf16_avx512.h. */
BF16_TARGET void opd_rms_norm_bf16_avx512(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t rows, int64_t n,
                                          float eps, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) rms_norm_row16(x + r * n, w, y + r * n, n, eps);
}

BF16_TARGET void opd_rope_bf16_avx512(uint16_t *x, int64_t rows, int64_t stride, int64_t heads, int64_t D,
                                      const uint16_t *cos, const uint16_t *sin, const int64_t *positions, int threads) {
    const int64_t half = D / 2, h16 = half & ~(int64_t)15;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *c = cos + positions[r] * D, *s = sin + positions[r] * D;
        for (int64_t h = 0; h < heads; h++) {
            uint16_t *v = x + r * stride + h * D;
            for (int64_t i = 0; i < h16; i += 16) {
                const __m512 a = load16(v + i), b = load16(v + half + i);
                const __m512 lo = _mm512_add_ps(round16(_mm512_mul_ps(a, load16(c + i))),
                                                round16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), b), load16(s + i))));
                const __m512 hi = _mm512_add_ps(round16(_mm512_mul_ps(b, load16(c + half + i))),
                                                round16(_mm512_mul_ps(a, load16(s + half + i))));
                store16(v + i, lo);
                store16(v + half + i, hi);
            }
            rope_tail(v, c, s, half, h16);
        }
    }
}

/* The residual add and the next RMSNorm in one pass (opd.llama.causal_hidden: after the attention's output product
 * and after the MLP's): x = bf16(x + d) in place, then y = rms_norm(x) as above, each row still in L1 for the
 * norm (two passes over x and two more over y where the add and the norm are separate ops). */
BF16_TARGET void opd_add_rms_norm_bf16_avx512(uint16_t *x, const uint16_t *d, const uint16_t *w, uint16_t *y,
                                              int64_t rows, int64_t n, float eps, int threads) {
    const int64_t n16 = n & ~(int64_t)15;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        uint16_t *xr = x + r * n;
        const uint16_t *dr = d + r * n;
        for (int64_t i = 0; i < n16; i += 16) store16(xr + i, _mm512_add_ps(load16(xr + i), load16(dr + i)));
        for (int64_t i = n16; i < n; i++) xr[i] = fp32_to_bf16(bf16_to_fp32(xr[i]) + bf16_to_fp32(dr[i]));
        rms_norm_row16(xr, w, y + r * n, n, eps);
    }
}

/* y = bf16(bf16(silu(g)) * u) over one row of n values */
BF16_TARGET static inline void silu_mul_row(const uint16_t *g, const uint16_t *u, uint16_t *y, int64_t n) {
    const int64_t n16 = n & ~(int64_t)15;
    for (int64_t i = 0; i < n16; i += 16) {
        const __m512 gv = load16(g + i);
        const __m512 silu = round16(_mm512_mul_ps(gv, sigmoid16(gv)));
        store16(y + i, _mm512_mul_ps(silu, load16(u + i)));
    }
    for (int64_t i = n16; i < n; i++) {
        const float gv = bf16_to_fp32(g[i]);
        y[i] = fp32_to_bf16(bf16_to_fp32(fp32_to_bf16(gv / (1.0f + exp_poly(-gv)))) * bf16_to_fp32(u[i]));
    }
}

BF16_TARGET void opd_silu_mul_bf16_avx512(const uint16_t *gate_up, uint16_t *y, int64_t rows, int64_t inter,
                                          int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) silu_mul_row(gate_up + r * 2 * inter, gate_up + r * 2 * inter + inter, y + r * inter, inter);
}

/* ---- bf16 training (opd.update.layer_ops: the update's forward and backward through bf16 weights). The forward
 * steps above, plus SiLU x up of separate gate and up tensors (HF's MLP makes them with two products), and the
 * backward passes of both steps in one pass a row each, where autograd replays torch's 6-10 elementwise ops at
 * bf16's slow CPU rate. Each rounds to bf16 where autograd's ops on bf16 tensors round:
 *   SiLU x up:  du = bf16(dy * bf16(silu(g)))   dg = bf16(bf16(dy * u) * s (1 + g (1 - s))),  s = sigmoid(g)
 *   RMSNorm:    with r = rsqrt(mean(x^2) + eps), dyw = bf16(dy * w), s = sum(dyw * x):
 *               dx = bf16(dyw r - x s r^3 / n)        dw = sum over rows of bf16(dy * bf16(x r)) (fp32 sums) */
BF16_TARGET void opd_silu_mul_pair_bf16_avx512(const uint16_t *g, const uint16_t *u, uint16_t *y, int64_t rows,
                                               int64_t inter, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) silu_mul_row(g + r * inter, u + r * inter, y + r * inter, inter);
}

BF16_TARGET void opd_silu_mul_backward_bf16_avx512(const uint16_t *g, const uint16_t *u, const uint16_t *dy,
                                                   uint16_t *dg, uint16_t *du, int64_t rows, int64_t inter,
                                                   int threads) {
    const int64_t n16 = inter & ~(int64_t)15;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t o = r * inter;
        const __m512 one = _mm512_set1_ps(1.0f);
        for (int64_t i = 0; i < n16; i += 16) {
            const __m512 gv = load16(g + o + i), dyv = load16(dy + o + i), sig = sigmoid16(gv);
            store16(du + o + i, _mm512_mul_ps(dyv, round16(_mm512_mul_ps(gv, sig))));
            const __m512 dact = round16(_mm512_mul_ps(dyv, load16(u + o + i)));
            const __m512 dsilu = _mm512_mul_ps(sig, _mm512_fmadd_ps(gv, _mm512_sub_ps(one, sig), one));
            store16(dg + o + i, _mm512_mul_ps(dact, dsilu));
        }
        for (int64_t i = n16; i < inter; i++) {
            const float gv = bf16_to_fp32(g[o + i]), dyv = bf16_to_fp32(dy[o + i]);
            const float sig = 1.0f / (1.0f + exp_poly(-gv));
            du[o + i] = fp32_to_bf16(dyv * bf16_to_fp32(fp32_to_bf16(gv * sig)));
            const float dact = bf16_to_fp32(fp32_to_bf16(dyv * bf16_to_fp32(u[o + i])));
            dg[o + i] = fp32_to_bf16(dact * (sig * (1.0f + gv * (1.0f - sig))));
        }
    }
}

/* dw_parts: threads x n floats, each thread's sums over its rows (the caller adds them and rounds once) */
BF16_TARGET void opd_rms_norm_backward_bf16_avx512(const uint16_t *x, const uint16_t *w, const uint16_t *dy,
                                                   uint16_t *dx, float *dw_parts, int64_t rows, int64_t n, float eps,
                                                   int threads) {
    const int64_t n16 = n & ~(int64_t)15;
    #pragma omp parallel num_threads(threads)
    {
        float *dw = thread_part(dw_parts, n * (int64_t)sizeof(float));
        for (int64_t i = 0; i < n; i++) dw[i] = 0.0f;
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const uint16_t *xr = x + r * n, *dyr = dy + r * n;
            uint16_t *dxr = dx + r * n;
            const float inv = inv_rms16(xr, n, eps);
            const __m512 vinv = _mm512_set1_ps(inv);
            __m512 sacc = _mm512_setzero_ps();
            for (int64_t i = 0; i < n16; i += 16) {
                const __m512 xv = load16(xr + i), dyv = load16(dyr + i);
                sacc = _mm512_fmadd_ps(round16(_mm512_mul_ps(dyv, load16(w + i))), xv, sacc);
                const __m512 prod = round16(_mm512_mul_ps(dyv, round16(_mm512_mul_ps(xv, vinv))));
                _mm512_storeu_ps(dw + i, _mm512_add_ps(_mm512_loadu_ps(dw + i), prod));
            }
            float s = _mm512_reduce_add_ps(sacc);
            for (int64_t i = n16; i < n; i++) {
                const float xv = bf16_to_fp32(xr[i]), dyv = bf16_to_fp32(dyr[i]);
                s += bf16_to_fp32(fp32_to_bf16(dyv * bf16_to_fp32(w[i]))) * xv;
                dw[i] += bf16_to_fp32(fp32_to_bf16(dyv * bf16_to_fp32(fp32_to_bf16(xv * inv))));
            }
            const float c = -s * inv * inv * inv / (float)n;
            const __m512 vc = _mm512_set1_ps(c);
            for (int64_t i = 0; i < n16; i += 16) {
                const __m512 dyw = round16(_mm512_mul_ps(load16(dyr + i), load16(w + i)));
                store16(dxr + i, _mm512_fmadd_ps(load16(xr + i), vc, _mm512_mul_ps(dyw, vinv)));
            }
            for (int64_t i = n16; i < n; i++) {
                const float dyw = bf16_to_fp32(fp32_to_bf16(bf16_to_fp32(dyr[i]) * bf16_to_fp32(w[i])));
                dxr[i] = fp32_to_bf16(dyw * inv + bf16_to_fp32(xr[i]) * c);
            }
        }
    }
}

/* ---- fp32 (the fp32 teacher's scoring forward and the rollout's fp32 prefill): the same three steps in one pass
 * each where torch makes two to six (F.rms_norm's composite on the CPU; cat, neg, two muls and an add for RoPE;
 * SiLU and the product). Memory-bound, so 8 lanes on every AVX2 CPU. Each product and sum is rounded as torch's
 * separate ops round it (no FMA where torch has a mul and an add), so the results are torch's up to its own
 * reduction order in the norm and its exp in SiLU (~1 ulp). */
void opd_rms_norm_f32(const float *x, const float *w, float *y, int64_t rows, int64_t n, float eps, int threads) {
    const int64_t n8 = n & ~(int64_t)7;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float *yr = y + r * n;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t i = 0; i < n8; i += 8) {
            const __m256 v = _mm256_loadu_ps(xr + i);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        float ss = hsum(acc);
        for (int64_t i = n8; i < n; i++) ss += xr[i] * xr[i];
        const float inv = 1.0f / sqrtf(ss / (float)n + eps);
        const __m256 vinv = _mm256_set1_ps(inv);
        for (int64_t i = 0; i < n8; i += 8)
            _mm256_storeu_ps(yr + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + i), vinv), _mm256_loadu_ps(w + i)));
        for (int64_t i = n8; i < n; i++) yr[i] = xr[i] * inv * w[i];
    }
}

void opd_rope_f32(float *x, int64_t rows, int64_t stride, int64_t heads, int64_t D, const float *cos,
                  const float *sin, const int64_t *positions, int threads) {
    const int64_t half = D / 2, h8 = half & ~(int64_t)7;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos + positions[r] * D, *s = sin + positions[r] * D;
        for (int64_t h = 0; h < heads; h++) {
            float *v = x + r * stride + h * D;
            for (int64_t i = 0; i < h8; i += 8) {
                const __m256 a = _mm256_loadu_ps(v + i), b = _mm256_loadu_ps(v + half + i);
                const __m256 lo = _mm256_sub_ps(_mm256_mul_ps(a, _mm256_loadu_ps(c + i)), _mm256_mul_ps(b, _mm256_loadu_ps(s + i)));
                const __m256 hi = _mm256_add_ps(_mm256_mul_ps(b, _mm256_loadu_ps(c + half + i)),
                                                _mm256_mul_ps(a, _mm256_loadu_ps(s + half + i)));
                _mm256_storeu_ps(v + i, lo);
                _mm256_storeu_ps(v + half + i, hi);
            }
            for (int64_t i = h8; i < half; i++) {
                const float a = v[i], b = v[half + i];
                v[i] = a * c[i] - b * s[i];
                v[half + i] = b * c[half + i] + a * s[half + i];
            }
        }
    }
}

void opd_silu_mul_f32(const float *gate_up, float *y, int64_t rows, int64_t inter, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++)
        silu_mul_row8(gate_up + r * 2 * inter, gate_up + r * 2 * inter + inter, y + r * inter, inter);
}

/* ---- the update's causal attention probabilities (AVX-512 BF16 build; opd.update.layer_ops.CausalSoftmaxBF16)
 * probs = bf16(softmax(scale x scores)) over each row's keys 0 .. its query's position, zeros after: the queries'
 * scaling, the causal mask, the fp32 softmax and the cast to bf16 of HF's eager attention in one pass a row, and
 * their backward ds = bf16(scale x p * (dp - sum_j dp_j p_j)) in one more (with a power-of-two scale, as head size
 * 64 gives, scaling the product is exactly scaling the queries: the same bits), from the saved bf16 probabilities
 * (autograd keeps the fp32 ones: the product differs by a bf16 rounding of p, below the bf16 rounding of ds
 * itself). scores / probs are [rows, Lk] with row r the query at position r % Lq + (Lk - Lq) (a group's query heads
 * stacked as rows). */

BF16_TARGET static inline __m512 load16m(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

BF16_TARGET static inline void store16m(uint16_t *p, __m512 x, __mmask16 m) {
    _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(x));
}

BF16_TARGET void opd_causal_softmax_bf16_avx512(const uint16_t *scores, uint16_t *probs, int64_t rows, int64_t Lq,
                                                int64_t Lk, float scale, int threads) {
    const __m512 vscale = _mm512_set1_ps(scale);
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *s = scores + r * Lk;
        uint16_t *p = probs + r * Lk;
        const int64_t n = r % Lq + (Lk - Lq) + 1;  /* keys seen */
        float e[n];
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < n; j += 16)
            vmax = _mm512_mask_max_ps(vmax, first16(n - j), vmax, _mm512_mul_ps(load16m(s + j, first16(n - j)), vscale));
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
        __m512 vsum = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 k = first16(n - j);
            const __m512 x = _mm512_maskz_mov_ps(k, exp16_scalef(_mm512_sub_ps(_mm512_mul_ps(load16m(s + j, k), vscale), m)));
            vsum = _mm512_add_ps(vsum, x);
            _mm512_mask_storeu_ps(e + j, k, x);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 k = first16(n - j);
            store16m(p + j, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, e + j), inv), k);
        }
        for (int64_t j = n; j < Lk; j++) p[j] = 0;
    }
}

BF16_TARGET void opd_causal_softmax_backward_bf16_avx512(const uint16_t *probs, const uint16_t *dprobs, uint16_t *dscores,
                                                         int64_t rows, int64_t Lq, int64_t Lk, float scale, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *p = probs + r * Lk, *dp = dprobs + r * Lk;
        uint16_t *ds = dscores + r * Lk;
        const int64_t n = r % Lq + (Lk - Lq) + 1;
        __m512 vdot = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 k = first16(n - j);
            vdot = _mm512_fmadd_ps(load16m(p + j, k), load16m(dp + j, k), vdot);
        }
        const __m512 dot = _mm512_set1_ps(_mm512_reduce_add_ps(vdot)), vscale = _mm512_set1_ps(scale);
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 k = first16(n - j);
            const __m512 d = _mm512_mul_ps(load16m(p + j, k), _mm512_sub_ps(load16m(dp + j, k), dot));
            store16m(ds + j, _mm512_mul_ps(d, vscale), k);
        }
        for (int64_t j = n; j < Lk; j++) ds[j] = 0;
    }
}
