/* One token per row of logits [B, V] (fp32) drawn from softmax(logits / T) by inverse CDF, with its log-prob: the
 * distribution of opd.rollout.guidance.draw (one uniform u in (0, 1] a row; the first token whose running sum of
 * probability reaches u; a token of mass 0 is never drawn), in one pass over the row and a search over block sums,
 * where torch's log_softmax, exp, float64 cumsum and searchsorted make ~6 passes (~0.5 ms a decode step at batch 4
 * and a 49k vocabulary on 2 cores; bench/NOTES.md, session 14). Running sums in float64. */
#include <math.h>
#include <stdint.h>

#include "exp_poly.h"
#include "simd.h"

#define BLOCK 64

/* scratch: per thread, V floats and (V / BLOCK + 1) doubles. A row with a NaN logit, a +inf one or none finite:
 * token -1 and log-prob NaN (the caller refuses them). */
void opd_sample_rows(const float *logits, int64_t B, int64_t V, float inv_t, const double *u, int64_t *tok,
                     float *tok_logp, void *scratch, int threads) {
    const int64_t blocks = (V + BLOCK - 1) / BLOCK;
    const int64_t per_thread = V * (int64_t)sizeof(float) + (blocks + 1) * (int64_t)sizeof(double);
    #pragma omp parallel num_threads(threads)
    {
        char *mine = thread_part(scratch, per_thread);
        float *e = (float *)mine;
        double *sums = (double *)(mine + V * sizeof(float));
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < B; r++) {
            const float *z = logits + r * V;
            const __m256 vt = _mm256_set1_ps(inv_t);
            const int64_t V8 = V & ~(int64_t)7;
            __m256 top = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
            for (int64_t i = 0; i < V8; i += 8) {
                const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(z + i), vt);
                top = _mm256_max_ps(top, v);
                nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));  /* max_ps passes a NaN by */
            }
            float lanes[8], m = -INFINITY;
            _mm256_storeu_ps(lanes, top);
            for (int k = 0; k < 8; k++) m = lanes[k] > m ? lanes[k] : m;
            int bad = _mm256_movemask_ps(nan) != 0;
            for (int64_t i = V8; i < V; i++) {
                bad |= isnan(z[i] * inv_t);
                m = z[i] * inv_t > m ? z[i] * inv_t : m;
            }
            if (bad || isinf(m)) {  /* NaN, +inf or no finite logit: no distribution to draw from */
                tok[r] = -1;
                tok_logp[r] = NAN;
                continue;
            }
            const __m256 vm = _mm256_set1_ps(m);
            double total = 0.0;
            for (int64_t b = 0; b < blocks; b++) {
                const int64_t i0 = b * BLOCK, i1 = i0 + BLOCK < V ? i0 + BLOCK : V;
                float s = 0.0f;
                int64_t i = i0;
                if (i1 - i0 == BLOCK) {
                    __m256 acc = _mm256_setzero_ps();
                    for (; i < i1; i += 8) {
                        const __m256 v = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(z + i), vt, vm));
                        _mm256_storeu_ps(e + i, v);
                        acc = _mm256_add_ps(acc, v);
                    }
                    s = hsum(acc);
                }
                for (; i < i1; i++) {
                    e[i] = exp_poly(z[i] * inv_t - m);
                    s += e[i];
                }
                sums[b] = s;
                total += s;
            }
            const double target = u[r] * total;
            double run = 0.0;
            int64_t b = 0;
            while (b < blocks - 1 && run + sums[b] < target) run += sums[b++];
            int64_t pick = b * BLOCK, end = pick + BLOCK < V ? pick + BLOCK : V;
            for (; pick < end; pick++) {
                run += e[pick];
                if (run >= target && e[pick] > 0.0f) break;
            }
            if (pick >= end) {  /* rounding left the target just past this block's sum: its last token of mass > 0 */
                for (pick = end - 1; pick > 0 && e[pick] == 0.0f; pick--) {}
            }
            tok[r] = pick;
            tok_logp[r] = (z[pick] * inv_t - m) - (float)log(total);
        }
    }
}
