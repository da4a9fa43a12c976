/* bf16 products of a frozen model's forward on the AMX tile unit: out = x W^T for x [M, K] bf16 rows and a weight
 * W [N, K] packed once (opd.cpu_kernels.AmxWeight) in the tile unit's layout: 16-output column tiles, each
 * [K / 32][16 pair rows][16 columns x 2] (1 KB per 32 k). torch's oneDNN path ran the teacher's [2048, 576] x
 * [576, N] products at about the same rate, but wrote their output in bf16 for separate SiLU x up and RoPE passes
 * over it, and its LM head wrote [positions, vocabulary] logits for another pass (bench/NOTES.md, session 25).
 *
 * The kernel: 32 rows x 32 columns (a pair of column tiles) in four fp32 sum tiles, two row tiles of x (loaded
 * straight from its rows) and two weight tiles per 32 k, each loaded tile used in two products. A thread takes a
 * contiguous range of rows; within it, chunks of rows that stay in L2, and for each chunk every pair of column
 * tiles in turn, over the chunk's row blocks (the pair's weight tiles, 36 KB at K = 576, stay in L1; a longer K goes
 * in parts of 512 k, each part over the chunk's row blocks, their fp32 sums kept between parts). The blocks
 * run as a pipeline: block i's products go to the tile unit with block i - 1's epilogue on the vector units, a few
 * of its rows after each 32 k (run whole between two blocks' products, the epilogues did not overlap them), then
 * block i's sums are stored to the other of two 4 KB fp32 buffers. Epilogues:
 *   OUT_BF16:  out = bf16(sums), each column tile to its own output columns (AmxWeight.tile_cols); with RoPE for
 *              the pairs of a QKV weight's query and key heads (see Epilogue)
 *   ADD_BF16:  out += bf16(sums), rounded to bf16: the residual stream x takes the attention's and the MLP's output
 *              in place; with row_scale_out, each row's 1 / rms after it (the next product's folded RMSNorm)
 *   SILU_MUL:  the pair is a gate tile and its up tile (AmxWeight(silu_mul=True)): out [M, N / 2] =
 *              bf16(bf16(silu(g)) * u) with g, u the sums rounded to bf16, as the unfused product and layer_ops.c's
 *              silu_mul round; with `stream` (an output larger than the L2s), in streaming stores of whole lines:
 *              an ordinary store first reads each line of the output from memory (the teacher's 6 MB at 8 x 256)
 *              and waits on it; 91 -> 80 ms of the 8 x 256 forward's gate/up products (bench/NOTES.md, session 26)
 * OUT_BF16 and SILU_MUL with row_scale: each row's sums times its scale first (the RMSNorm folded into the weight);
 * and opd_amx_head_terms_bf16 below: the LM head's sums straight into the teacher's token terms.
 * Rows: M a multiple of 16 (a last block of 16 rows runs two tiles; the caller pads). The tile state needs
 * opd_gemm_amx_request (amx.h). */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "amx.h"
#include "bf16_avx512.h"
#include "exp_poly.h"

#define AMXBF16 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")))

enum { OUT_BF16 = 0, SILU_MUL = 1, ADD_BF16 = 2 };

static int gemm_amx_granted = 0;

int opd_gemm_amx_request(void) {
    gemm_amx_granted = amx_request_state();
    return gemm_amx_granted;
}

/* RoPE in the epilogue of a QKV product: a pair of column tiles holds dims d .. d + 15 (a) and d + D/2 .. d + D/2 + 15
 * (b) of one query or key head (AmxWeight's rope layout), rotated at the row's position (row % rope_len: rows from
 * position 0). a and b are rounded to bf16 (the product's output, as HF's q and k), then each rotated value is one
 * bf16 dot product of the pair (a, b) with a row of the table (cpu_kernels.amx_rope_table: [rope_len][2 D] bf16, the
 * pairs (cos d, -sin d) then (sin d', cos d'), d' = d + D/2), rounded once:
 *   lo = bf16(a c - b s),  hi = bf16(b c' + a s')
 * (the products exact, their sum rounded to fp32: HF's bf16 ops round each product and the sum, three roundings, and
 * a rope pass that rounds where they do took ~20% of the QKV product's time, bench/NOTES.md session 29).
 *
 * The folded RMSNorm: a product whose input rows are the residual stream x itself, with the norm's weight folded
 * into its own (opd.llama: W diag(w)), scales each output row's sums by row_scale[row] = 1 / rms(x row) before its
 * epilogue; the product that adds into x (ADD_BF16) writes those scales for the next one (row_scale_out): each
 * row's squares summed, 16 lanes a row, as its pairs' epilogues store it, and 1 / sqrt(mean + eps) once a chunk's
 * rows are complete. No pass over the rows, no normed copy of x. */
typedef struct {
    const int32_t *tile_cols;   /* the output column of each packed column tile (NULL: tile i at column 16 i) */
    int64_t rope_pairs;         /* pairs below this are rotated */
    const uint16_t *rope_tab;   /* [rope_len, 2 head_dim] */
    int64_t rope_len, head_dim;
    const float *row_scale;     /* NULL, or each output row's scale (the folded norm) */
} Epilogue;

/* (a[i], b[i]) pairs of the bf16 roundings of a and b, as one vector of 32 bf16 */
AMXBF16 static inline __m512bh pairs16(__m512 a, __m512 b) {
    const __m512i ab = (__m512i)_mm512_cvtne2ps_pbh(b, a);  /* a in the low 16 words, b in the high 16 */
    const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                         23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    return (__m512bh)_mm512_permutexvar_epi16(idx, ab);
}

/* rows r0 .. r1 - 1 of the sums C [32][32] (fp32) of pair p (two column tiles), rows row0 + r of the output, into out;
 * SILU_MUL with `stage` (those rows' 16 bf16 each): an even pair's 32 bytes of a row wait there for the odd pair's,
 * and the 64-byte line goes out in one streaming store; ADD_BF16 with `ss` (those rows' 16 fp32 lanes each): each
 * row's squares after the add, summed over its pairs */
AMXBF16 static inline void epilogue(const float *C, int r0, int r1, uint16_t *out, int64_t ldo, int64_t p, int64_t row0,
                                    int mode, const Epilogue *e, uint16_t *stage, float *ss) {
    const int64_t col_a = e->tile_cols ? e->tile_cols[2 * p] : 32 * p, col_b = e->tile_cols ? e->tile_cols[2 * p + 1] : 32 * p + 16;
    const float *scale = e->row_scale ? e->row_scale + row0 : NULL;
#define SCALED(v, r) (scale ? _mm512_mul_ps((v), _mm512_set1_ps(scale[r])) : (v))
    if (mode == SILU_MUL) {  /* a: gate, b: up of output columns 16 p .. 16 p + 15 */
        for (int r = r0; r < r1; r++) {
            const __m512 g = round16(SCALED(_mm512_loadu_ps(C + r * 32), r));
            const __m512 u = round16(SCALED(_mm512_loadu_ps(C + r * 32 + 16), r));
            const __m512 silu = round16(_mm512_mul_ps(g, sigmoid16(g)));
            if (!stage) store16(out + r * ldo + 16 * p, _mm512_mul_ps(silu, u));
            else if (!(p & 1)) store16(stage + r * 16, _mm512_mul_ps(silu, u));
            else {  /* the even pair's half line and this one's: a whole line, streamed */
                const __m256i lo = _mm256_load_si256((const __m256i *)(stage + r * 16));
                const __m256i hi = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(silu, u));
                _mm512_stream_si512((__m512i *)(out + r * ldo + 16 * (p - 1)), _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
            }
        }
    } else if (p < e->rope_pairs) {
        const int64_t D = e->head_dim, d = col_a % D;
        for (int r = r0; r < r1; r++) {
            const uint16_t *t = e->rope_tab + ((row0 + r) % e->rope_len) * 2 * D + 2 * d;
            const __m512bh ab = pairs16(SCALED(_mm512_loadu_ps(C + r * 32), r), SCALED(_mm512_loadu_ps(C + r * 32 + 16), r));
            const __m512 lo = _mm512_dpbf16_ps(_mm512_setzero_ps(), ab, (__m512bh)_mm512_loadu_si512(t));
            const __m512 hi = _mm512_dpbf16_ps(_mm512_setzero_ps(), ab, (__m512bh)_mm512_loadu_si512(t + D));
            store16(out + r * ldo + col_a, lo);
            store16(out + r * ldo + col_b, hi);
        }
    } else if (mode == ADD_BF16) {  /* the residual stream: out = bf16(out + bf16(sums)), as x.add_(product) rounds */
        for (int r = r0; r < r1; r++) {
            uint16_t *o = out + r * ldo;
            const __m256i a = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(load16(o + col_a), round16(_mm512_loadu_ps(C + r * 32))));
            const __m256i b = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(load16(o + col_b), round16(_mm512_loadu_ps(C + r * 32 + 16))));
            _mm256_storeu_si256((__m256i *)(o + col_a), a);
            _mm256_storeu_si256((__m256i *)(o + col_b), b);
            if (ss) {
                const __m512 va = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(a), 16));
                const __m512 vb = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
                const __m512 acc = p ? _mm512_load_ps(ss + r * 16) : _mm512_setzero_ps();
                _mm512_store_ps(ss + r * 16, _mm512_fmadd_ps(va, va, _mm512_fmadd_ps(vb, vb, acc)));
            }
        }
    } else if (col_b == col_a + 16) {
        for (int r = r0; r < r1; r++)
            _mm512_storeu_si512(out + r * ldo + col_a, (__m512i)_mm512_cvtne2ps_pbh(SCALED(_mm512_loadu_ps(C + r * 32 + 16), r),
                                                                                      SCALED(_mm512_loadu_ps(C + r * 32), r)));
    } else {
        for (int r = r0; r < r1; r++) {
            store16(out + r * ldo + col_a, SCALED(_mm512_loadu_ps(C + r * 32), r));
            store16(out + r * ldo + col_b, SCALED(_mm512_loadu_ps(C + r * 32 + 16), r));
        }
    }
#undef SCALED
}

/* A block of 32 x 32 sums: pair p of column tiles, rows m .. m + rows - 1 (of a chunk, or of the whole product) */
typedef struct { int64_t p, m; int rows; } Block;

/* The LM head's sums into each row's terms (opd_amx_head_terms_bf16 below): 8 lanes of sums a row, one 64-byte line,
 * relative to the row's max logit so far (m, kept beside them). A row's state is read and written for every block of
 * 32 columns; at 16 lanes of max, sum and entropy sum (192 bytes) its traffic through L1 pushed the head's weight
 * tiles out (the head 5% faster, bench/NOTES.md session 30). */
typedef struct { float s[8], u[8]; } LaneSums;

AMXBF16 static inline void terms_update(const float *C, int r0, int r1, LaneSums *st, float *m, float scale2) {
    const __m512 sc2 = _mm512_set1_ps(scale2);
    const __m512i hi = _mm512_set1_epi32((int)0xFFFF0000u);
    for (int r = r0; r < r1; r++) {
        /* the row's 32 logits rounded to bf16 (as the bf16 forward's are) in one conversion, back to fp32 as the low
         * and the high halves of its dwords: two vectors of 16 in another order than the columns', which the sums
         * do not mind */
        const __m512i v = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(C + r * 32 + 16), _mm512_loadu_ps(C + r * 32));
        const __m512 ya = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), yb = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
        const __m512 vmax = _mm512_max_ps(ya, yb);
        __m256 s = _mm256_loadu_ps(st[r].s), u = _mm256_loadu_ps(st[r].u);
        if (_mm512_cmp_ps_mask(vmax, _mm512_set1_ps(m[r]), _CMP_GT_OQ)) {  /* a new max: rare after the first blocks */
            const float mnew = _mm512_reduce_max_ps(vmax), d = (m[r] - mnew) * scale2, f = exp2f(d);
            u = _mm256_mul_ps(_mm256_set1_ps(f), _mm256_fmadd_ps(s, _mm256_set1_ps(d), u));
            s = _mm256_mul_ps(_mm256_set1_ps(f), s);
            m[r] = mnew;
        }
        const __m512 nm = _mm512_set1_ps(-m[r] * scale2);
        const __m512 da = _mm512_fmadd_ps(ya, sc2, nm), db = _mm512_fmadd_ps(yb, sc2, nm);
        /* degree 4 (relative error 2.7e-6 a term, so ~3e-6 in the log-sum-exp and entropy; the logits' own bf16
         * rounding is 2^-8): two FMAs fewer a vector, the LM head 3.8% faster (bench/NOTES.md, session 29) */
        const __m512 ea = exp2_16_bf16(da), eb = exp2_16_bf16(db);
        const __m512 es = _mm512_add_ps(ea, eb), eu = _mm512_fmadd_ps(ea, da, _mm512_mul_ps(eb, db));
        s = _mm256_add_ps(s, _mm256_add_ps(_mm512_castps512_ps256(es), _mm512_extractf32x8_ps(es, 1)));
        u = _mm256_add_ps(u, _mm256_add_ps(_mm512_castps512_ps256(eu), _mm512_extractf32x8_ps(eu, 1)));
        _mm256_storeu_ps(st[r].s, s);
        _mm256_storeu_ps(st[r].u, u);
    }
}

/* a block's sums into its rows' lane sums, and the logit of each row's target where it is among the block's columns */
AMXBF16 static inline void terms_block(const float *C, Block b, int r0, int r1, LaneSums *st, float *m, float *target_z,
                                       const int64_t *targets, float scale2) {
    terms_update(C, r0, r1, st + b.m, m + b.m, scale2);
    for (int r = r0; r < r1; r++) {
        const int64_t j = targets[b.m + r] - b.p * 32;
        if (j >= 0 && j < 32) {
            union { uint32_t i; float f; } v = { .f = C[r * 32 + j] };
            v.i = (v.i + 0x7FFF + ((v.i >> 16) & 1)) & 0xFFFF0000u;  /* to bf16, nearest even */
            target_z[b.m + r] = v.f * scale2;
        }
    }
}

/* Blocks run as a pipeline: block i's products go to the tile unit while block i - 1's epilogue (its sums stored in
 * the other of two buffers) runs on the vector units, a few rows after each 32 k of block i's products, so that the
 * two kinds of work interleave in the core's window; then block i's sums are stored. */
typedef struct {
    const float *C;
    Block b;
    int done;                                  /* rows of the epilogue done so far */
    uint16_t *out; int64_t ldo; int mode; const Epilogue *e;   /* a product's epilogue, or */
    LaneSums *st; float *row_max, *target_z; const int64_t *targets; float scale2;  /* the LM head's terms (st != NULL) */
    uint16_t *stage; int64_t stage_row0, stage_rows;  /* SILU_MUL streamed: a chunk's rows x 16, from row0 */
    float *ss; int64_t ss_row0;                /* ADD_BF16 with row_scale_out: a chunk's rows x 16 lanes, from row0 */
    int64_t row_base;                          /* the product's row number of block row 0 (RoPE's positions, scales) */
} Pending;

AMXBF16 static inline void pending_run(Pending *pd, int upto) {
    if (upto > pd->b.rows) upto = pd->b.rows;
    if (upto <= pd->done) return;
    if (pd->st) terms_block(pd->C, pd->b, pd->done, upto, pd->st, pd->row_max, pd->target_z, pd->targets, pd->scale2);
    else epilogue(pd->C, pd->done, upto, pd->out + pd->b.m * 16 * pd->ldo, pd->ldo, pd->b.p, pd->row_base + pd->b.m * 16,
                  pd->mode, pd->e,
                  pd->stage ? pd->stage + ((pd->b.m * 16 - pd->stage_row0) % pd->stage_rows) * 16 : NULL,
                  pd->ss ? pd->ss + (pd->b.m * 16 - pd->ss_row0) * 16 : NULL);
    pd->done = upto;
}

/* the sum tiles zeroed, or loaded from C [rows][32] fp32 (block_store's layout below) */
AMXBF16 static inline void block_start(const float *C, int rows) {
    if (!C) {
        _tile_zero(0);
        _tile_zero(1);
        if (rows == 32) {
            _tile_zero(2);
            _tile_zero(3);
        }
        return;
    }
    _tile_loadd(0, C, 128);
    _tile_loadd(1, C + 16, 128);
    if (rows == 32) {
        _tile_loadd(2, C + 16 * 32, 128);
        _tile_loadd(3, C + 16 * 32 + 16, 128);
    }
}

/* The products of 32 rows of x (from A, row stride lda elements) by column tiles B0, B1 over kbs blocks of 32 k, left
 * in sum tiles 0-3 (rows 0-15: tiles 0, 1; rows 16-31: tiles 2, 3), added to `init` (the sums of the k before, as
 * block_store left them) where it is not NULL. `rows` 16: the last 16 rows of an odd count of
 * row tiles (tiles 0, 1 only). x's tiles are loaded with the streaming hint (used once a pair of column tiles: they
 * need not push the pair's weight tiles out of L1); after each 32 k, a share of the pending epilogue's rows. */
AMXBF16 static inline void block_products(const uint16_t *A, int64_t lda, const uint16_t *B0, const uint16_t *B1,
                                          int64_t kbs, int rows, const float *init, Pending *pd) {
    const int step = pd->b.rows ? (int)((pd->b.rows + kbs - 1) / kbs) : 0;
    block_start(init, rows);
    if (rows == 32) {
        const uint16_t *A1 = A + 16 * lda;
        for (int64_t kb = 0; kb < kbs; kb++) {
            /* x's first row tile in the first two products, so that it is free (tiles are not renamed: a load
             * waits until every product reading the tile has read it) two products before the next 32 k need it,
             * and its load from L2 has that long: the bare loop 3.04 -> 3.2 TF/s a core (bench/NOTES.md, s. 27) */
            _tile_stream_loadd(4, A + kb * 32, lda * 2);
            _tile_loadd(6, B0 + kb * 512, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_loadd(7, B1 + kb * 512, 64);
            _tile_dpbf16ps(1, 4, 7);
            _tile_stream_loadd(5, A1 + kb * 32, lda * 2);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
            if (step) pending_run(pd, pd->done + step);
        }
    } else {
        for (int64_t kb = 0; kb < kbs; kb++) {
            _tile_stream_loadd(4, A + kb * 32, lda * 2);
            _tile_loadd(6, B0 + kb * 512, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_loadd(7, B1 + kb * 512, 64);
            _tile_dpbf16ps(1, 4, 7);
            if (step) pending_run(pd, pd->done + step);
        }
    }
    if (step) pending_run(pd, pd->b.rows);
}

/* the sum tiles into C [rows][32] fp32 */
AMXBF16 static inline void block_store(float *C, int rows) {
    _tile_stored(0, C, 128);
    _tile_stored(1, C + 16, 128);
    if (rows == 32) {
        _tile_stored(2, C + 16 * 32, 128);
        _tile_stored(3, C + 16 * 32 + 16, 128);
    }
}

/* This thread's row tiles [*t0, *t1) of `tiles` (inside a parallel region): an even split in pairs of tiles */
static inline void thread_tiles(int64_t tiles, int64_t *t0, int64_t *t1) {
#ifdef _OPENMP
    const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
#else
    const int64_t nt = 1, t = 0;
#endif
    const int64_t tile_pairs = (tiles + 1) / 2, p0 = tile_pairs * t / nt, p1 = tile_pairs * (t + 1) / nt;
    *t0 = 2 * p0;
    *t1 = 2 * p1 < tiles ? 2 * p1 : tiles;
}

/* The weight streams in from memory (a frozen model's layers are used once a forward): while a pair of column tiles
 * runs over a chunk's row blocks, the next pair's weight tiles (kbs blocks of 32 k from next0 and from next1) are
 * fetched, a share at each block, so that its first block does not wait on them. */
static inline void prefetch_share(const uint16_t *next0, const uint16_t *next1, int64_t kbs, int64_t block,
                                  int64_t blocks) {
    const int64_t lines = kbs * 32, per = (lines + blocks - 1) / blocks;  /* 64-byte lines of two 1 KB tiles a kb */
    for (int64_t l = block * per; l < (block + 1) * per && l < lines; l++)
        _mm_prefetch(l < kbs * 16 ? (const char *)next0 + l * 64 : (const char *)next1 + (l - kbs * 16) * 64, _MM_HINT_T1);
}

/* The tiles of each of equal chunks (no short last one; an even count) of `tiles` row tiles, at most about `most` a
 * chunk: a chunk's rows stream a weight in once, so a short last chunk would cost as much as a whole one */
static inline int64_t equal_chunk_tiles(int64_t tiles, int64_t most) {
    const int64_t chunks = (tiles + most - 1) / most;
    return (((tiles + chunks - 1) / chunks) + 1) & ~(int64_t)1;
}

/* One product's operands and epilogue (opd_amx_linear_bf16's arguments below), shared by the threads running it */
typedef struct {
    const uint16_t *Bp;         /* the packed weight [N / 16 column tiles][K / 32][16][32] */
    int64_t K, N, ldo;
    int mode, stream;           /* stream: SILU_MUL's output in streaming stores (checked against out's alignment) */
    Epilogue e;
    float *row_scale_out;       /* ADD_BF16: each row's 1 / rms after the add, or NULL */
    float eps;
} Product;

/* rows row0 .. row0 + 16 tiles - 1 of a product, by the calling thread: A and out at row row0 (x [.., K], out [.., ldo]);
 * row0 numbers the rows for RoPE's positions and the rows' scales. In chunks of rows that stay in L2, each chunk over
 * every pair of column tiles (see the top of this file). */
AMXBF16 static void product_rows(const Product *pr, const uint16_t *A, uint16_t *out, int64_t row0, int64_t tiles) {
    const int64_t K = pr->K, kbs = K / 32, pairs = pr->N / 32, ldo = pr->ldo;
    const uint16_t *Bp = pr->Bp;
    const int mode = pr->mode;
    /* rows of a chunk: ~768 KB of x, which stays in L2 (2 MB) with the chunk's output while every pair of column
     * tiles passes over it; 1.25 MB where the output is streamed (it does not stay): the weight, which streams in
     * once a chunk, then once a thread at 8 x 256 (gate/up 80.6 -> 76.5 ms of the forward; QKV, whose output stays,
     * was 2 ms slower with 1.25 MB chunks, session 27) */
    const int streamed = pr->stream && mode == SILU_MUL && pairs % 2 == 0 && (uintptr_t)out % 64 == 0 && ldo % 32 == 0;
    int64_t chunk_tiles = ((streamed ? 1280 : 768) * 1024) / (16 * K * 2);
    /* K in parts of 16 x 32 k where a pair of column tiles' weight (2 KB a 32 k) would not fit L1 (48 KB: the down
     * product's 96 KB at K = 1,536, whose tiles then all came from L2): the part's 32 KB stays in L1 over the
     * chunk's row blocks, whose fp32 sums wait in `partial` between parts (the same bits: stored and loaded
     * exactly). The down product 58.3 -> 53.9 ms of the 8 x 256 forward (session 28); two parts at K = 576 were
     * slower (their pair's 36 KB fits) */
    const int64_t kbp = kbs > 24 ? 16 : kbs, parts = (kbs + kbp - 1) / kbp;
    chunk_tiles = chunk_tiles < 2 ? 2 : chunk_tiles & ~(int64_t)1;
    tile_config_16x64();
    float C[2][32 * 32] __attribute__((aligned(64)));
    Pending pd = {.b = {0, 0, 0}, .out = out, .ldo = ldo, .mode = mode, .e = &pr->e, .row_base = row0};
    int64_t i = 0;
    const int64_t per = equal_chunk_tiles(tiles, chunk_tiles);
    uint16_t *stage = NULL;  /* streamed SILU_MUL: every pair of pairs fills whole 64-byte lines of a row */
    if (streamed) {
        stage = aligned_alloc(64, per * 16 * 32);
        pd.stage = stage, pd.stage_row0 = 0, pd.stage_rows = per * 16;
    }
    float *partial = parts > 1 ? aligned_alloc(64, (per / 2 + 1) * 32 * 32 * 4) : NULL;
    float *ss = mode == ADD_BF16 && pr->row_scale_out ? aligned_alloc(64, per * 16 * 16 * 4) : NULL;
    for (int64_t c0 = 0; c0 < tiles; c0 += per) {
        const int64_t c1 = c0 + per < tiles ? c0 + per : tiles;
        pd.ss = ss, pd.ss_row0 = c0 * 16;
        for (int64_t p = 0; p < pairs; p++)
            for (int64_t q = 0; q < parts; q++) {
                const int64_t kq = q * kbp, kqn = kbs - kq < kbp ? kbs - kq : kbp;
                const uint16_t *B0 = Bp + (2 * p * kbs + kq) * 512, *B1 = B0 + kbs * 512;
                /* the next part's weight tiles: this pair's, or the next pair's first */
                const int64_t np = q + 1 < parts ? p : (p + 1) % pairs, nq = q + 1 < parts ? kq + kbp : 0;
                const int64_t nn = kbs - nq < kbp ? kbs - nq : kbp;
                const uint16_t *next0 = Bp + (2 * np * kbs + nq) * 512, *next1 = next0 + kbs * 512;
                for (int64_t m = c0; m < c1; m += 2) {
                    const Block cur = {p, m, m + 1 < c1 ? 32 : 16};
                    float *sums = partial ? partial + ((m - c0) / 2) * 32 * 32 : NULL;
                    block_products(A + m * 16 * K + kq * 32, K, B0, B1, kqn, cur.rows, q ? sums : NULL,
                                   &pd);  /* and the last block's epilogue */
                    prefetch_share(next0, next1, nn, (m - c0) / 2, (c1 - c0 + 1) / 2);
                    if (q + 1 < parts) {
                        block_store(sums, cur.rows);
                        continue;
                    }
                    block_store(C[i & 1], cur.rows);
                    pd.C = C[i & 1], pd.b = cur, pd.done = 0;
                    i++;
                }
            }
        if (ss) {  /* the chunk's rows are complete once its last block is: their scales */
            pending_run(&pd, pd.b.rows);
            for (int64_t r = c0 * 16; r < c1 * 16; r++)
                pr->row_scale_out[row0 + r] =
                    1.0f / sqrtf(_mm512_reduce_add_ps(_mm512_load_ps(ss + (r - c0 * 16) * 16)) / (float)pr->N + pr->eps);
        }
    }
    pending_run(&pd, pd.b.rows);
    _tile_release();
    _mm_sfence();  /* the streamed stores, before the region's barrier */
    free(stage);
    free(partial);
    free(ss);
}

/* out = x W^T (mode OUT_BF16: out [M, N], RoPE on the first rope_pairs pairs), out += bf16(x W^T) (ADD_BF16), or
 * SiLU x up of it (SILU_MUL: out [M, N / 2], in streaming stores with `stream`); row stride ldo. row_scale (NULL or
 * [M]): each row's sums times it first (OUT_BF16, SILU_MUL: the folded RMSNorm); row_scale_out (NULL or [M],
 * ADD_BF16): 1 / sqrt(mean(out row^2) + eps) of each row after the add. M % 16 == 0, N % 32 == 0, K % 32 == 0.
 * Returns 0 (nothing done) without the tile state. */
AMXBF16 int opd_amx_linear_bf16(const uint16_t *A, int64_t M, int64_t K, const uint16_t *Bp, int64_t N,
                                uint16_t *out, int64_t ldo, int mode, const int32_t *tile_cols, int64_t rope_pairs,
                                const uint16_t *rope_tab, int64_t rope_len, int64_t head_dim, const float *row_scale,
                                float *row_scale_out, float eps, int stream, int threads) {
    if (!gemm_amx_granted || M % 16 || N % 32 || K % 32) return 0;
    const Product pr = {Bp, K, N, ldo, mode, stream,
                        {tile_cols, rope_pairs, rope_tab, rope_len, head_dim, mode == ADD_BF16 ? NULL : row_scale},
                        mode == ADD_BF16 ? row_scale_out : NULL, eps};
    #pragma omp parallel num_threads(threads)
    {
        int64_t t0, t1;
        thread_tiles(M / 16, &t0, &t1);
        if (t0 < t1) product_rows(&pr, A + t0 * 16 * K, out + t0 * 16 * ldo, t0 * 16, t1 - t0);
    }
    return 1;
}

/* A layer's MLP: gate/up (packed with silu_mul, the post-attention RMSNorm folded in: x's row scales) and down,
 * added into x (with row_scale_out: x's 1 / rms after it) */
typedef struct {
    Product gate_up, down;
} Mlp;

static inline Mlp mlp_of(const uint16_t *Wgu, const int32_t *gu_cols, const uint16_t *Wd, const int32_t *d_cols,
                         int64_t hidden, int64_t inter, const float *row_scale, float *row_scale_out, float eps) {
    const Mlp mlp = {{Wgu, hidden, 2 * inter, inter, SILU_MUL, 0, {gu_cols, 0, NULL, 1, 1, row_scale}, NULL, 0.0f},
                     {Wd, inter, hidden, hidden, ADD_BF16, 0, {d_cols, 0, NULL, 1, 1, NULL}, row_scale_out, eps}};
    return mlp;
}

/* the tiles of a chunk of a thread's `tiles` rows that go through both products in turn, about chunk_rows */
static inline int64_t mlp_chunk_tiles(int64_t tiles, int64_t chunk_rows) {
    return equal_chunk_tiles(tiles, chunk_rows < 32 ? 2 : (chunk_rows / 16) & ~(int64_t)1);
}

/* rows row0 .. row0 + 16 tiles - 1 of x through the MLP by the calling thread, `per` tiles at a time through both
 * products, SiLU x up in h [16 per, inter] (a buffer of the thread's own, which stays in its L2) */
AMXBF16 static void mlp_rows(const Mlp *mlp, uint16_t *x, int64_t row0, int64_t tiles, int64_t per, uint16_t *h) {
    const int64_t hidden = mlp->down.N;
    for (int64_t c0 = 0; c0 < tiles; c0 += per) {
        const int64_t n = (c0 + per < tiles ? c0 + per : tiles) - c0, row = row0 + c0 * 16;
        product_rows(&mlp->gate_up, x + row * hidden, h, row, n);
        product_rows(&mlp->down, h, x + row * hidden, row, n);
    }
}

/* The MLP of a layer, added into the residual stream x [M, hidden] in place: x += silu(g) u W_down^T with
 * (g, u) = row_scale x W_gate_up^T (the gate/up weight packed with silu_mul, the post-attention RMSNorm folded in;
 * row_scale: x's 1 / rms), and with row_scale_out (NULL or [M]) x's 1 / rms after it. Each thread takes chunks of
 * chunk_rows of its rows through both products in turn, SiLU x up in a buffer of its own that stays in its L2: as
 * two products, SiLU x up went through L3 or memory (12 MB at 8 x 512) between them. M % 16 == 0. */
AMXBF16 int opd_amx_mlp_bf16(uint16_t *x, int64_t M, int64_t hidden, const uint16_t *Wgu, const int32_t *gu_cols,
                             int64_t inter, const uint16_t *Wd, const int32_t *d_cols, const float *row_scale,
                             float *row_scale_out, float eps, int64_t chunk_rows, int threads) {
    if (!gemm_amx_granted || M % 16 || hidden % 32 || inter % 32) return 0;
    const Mlp mlp = mlp_of(Wgu, gu_cols, Wd, d_cols, hidden, inter, row_scale, row_scale_out, eps);
    #pragma omp parallel num_threads(threads)
    {
        int64_t t0, t1;
        thread_tiles(M / 16, &t0, &t1);
        if (t0 < t1) {
            const int64_t per = mlp_chunk_tiles(t1 - t0, chunk_rows);
            uint16_t *h = aligned_alloc(64, per * 16 * inter * 2);
            mlp_rows(&mlp, x, t0 * 16, t1 - t0, per, h);
            free(h);
        }
    }
    return 1;
}

/* 1 / sqrt(mean(x row^2) + eps) of rows x [M, n] bf16 (row stride ld) into scale [M]: the first layer's folded
 * RMSNorm (opd_amx_linear_bf16's row_scale; the products that add into x write the later ones) */
BF16_TARGET void opd_row_inv_rms_bf16(const uint16_t *x, int64_t M, int64_t n, int64_t ld, float eps, float *scale,
                                      int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < M; r++) scale[r] = inv_rms16(x + r * ld, n, eps);
}

/* ------------------------------------------------------------------------------------------- LM head and terms
 * The teacher's last step without a [positions, vocabulary] logits tensor: for rows h [M, K] of final hidden states,
 * the LM head's sums (rounded to bf16, as the bf16 forward's logits are) go straight into each row's online
 * log-sum-exp and entropy sums at temperature T, and the target token's logit is picked on the way:
 *   logprob = z_t - lse,  entropy = lse - sum p z,  with z = logits / T.
 * In base 2 (z2 = z log2 e, e = 2^(z2 - m)): each row keeps its max logit so far m and 8 lanes of (s = sum e,
 * u = sum e (z2 - m)), rescaled when m moves (rare after the first blocks), and the lanes are summed at the end. Rows go in
 * chunks that stay in L2, each chunk over every pair of the head's column tiles (the head's weight streams from L3
 * once per chunk). */
/* The most rows of a chunk: up to 1.25 MB of h (L2: 2 MB a core). A thread's rows go in chunks of equal size
 * (rounded up to 32 rows, hence the scratch's 32 more): the head streams in once a chunk, so no short last one. */
int64_t opd_amx_head_chunk_rows(int64_t K) {
    int64_t rows = (1280 * 1024) / (K * 2);
    rows &= ~(int64_t)31;
    return rows < 32 ? 32 : rows;
}

int64_t opd_amx_head_scratch_bytes(int64_t K) {
    return (opd_amx_head_chunk_rows(K) + 32) * (int64_t)(sizeof(LaneSums) + 8);
}

/* logprob[r] of targets[r] and entropy[r] (nats, at temperature 1 / inv_temp) of rows h [M, K] under the packed head
 * Wp [V, K]; M % 16 == 0 (pad with any rows: their results are written too), V % 32 == 0, K % 32 == 0; targets in
 * [0, V). scratch: threads x opd_amx_head_scratch_bytes(K). Returns 0 without the tile state. */
AMXBF16 int opd_amx_head_terms_bf16(const uint16_t *h, int64_t M, int64_t K, const uint16_t *Wp, int64_t V,
                                    const int64_t *targets, float inv_temp, float *logprob, float *entropy,
                                    uint8_t *scratch, int threads) {
    if (!gemm_amx_granted || M % 16 || V % 32 || K % 32) return 0;
    const int64_t kbs = K / 32, tiles = M / 16, pairs = V / 32, chunk_rows = opd_amx_head_chunk_rows(K);
    const float log2e = 1.44269504088896341f, ln2 = 0.693147180559945309f, scale2 = inv_temp * log2e;
    #pragma omp parallel num_threads(threads)
    {
        int64_t t0, t1;
        thread_tiles(tiles, &t0, &t1);
        const int64_t r0 = 16 * t0, r1 = 16 * t1;
#ifdef _OPENMP
        LaneSums *st = (LaneSums *)(scratch + omp_get_thread_num() * opd_amx_head_scratch_bytes(K));
#else
        LaneSums *st = (LaneSums *)scratch;
#endif
        float *target_z = (float *)(st + chunk_rows + 32), *row_max = target_z + chunk_rows + 32;
        if (r0 < r1) {
            tile_config_16x64();
            float C[2][32 * 32] __attribute__((aligned(64)));
            const int64_t chunks = (r1 - r0 + chunk_rows - 1) / chunk_rows;
            const int64_t per = ((r1 - r0 + chunks - 1) / chunks + 31) & ~(int64_t)31;
            for (int64_t c0 = r0; c0 < r1; c0 += per) {
                const int64_t c1 = c0 + per < r1 ? c0 + per : r1, n = c1 - c0;
                for (int64_t r = 0; r < n; r++) {
                    for (int l = 0; l < 8; l++) st[r].s[l] = 0.0f, st[r].u[l] = 0.0f;
                    row_max[r] = -1e30f, target_z[r] = 0.0f;
                }
                Pending pd = {.b = {0, 0, 0}, .st = st, .row_max = row_max, .target_z = target_z, .targets = targets + c0, .scale2 = scale2};
                int64_t i = 0;
                for (int64_t p = 0; p < pairs; p++) {
                    const uint16_t *B0 = Wp + (2 * p) * kbs * 512, *B1 = B0 + kbs * 512;
                    const uint16_t *next = Wp + (2 * ((p + 1) % pairs)) * kbs * 512;
                    for (int64_t m = 0; m < n; m += 32, i++) {
                        const Block cur = {p, m, n - m >= 32 ? 32 : 16};
                        block_products(h + (c0 + m) * K, K, B0, B1, kbs, cur.rows, NULL, &pd);
                        prefetch_share(next, next + kbs * 512, kbs, m / 32, (n + 31) / 32);
                        block_store(C[i & 1], cur.rows);
                        pd.C = C[i & 1], pd.b = cur, pd.done = 0;
                    }
                }
                pending_run(&pd, pd.b.rows);
                for (int64_t r = 0; r < n; r++) {  /* merge the lanes (all relative to the row's max) */
                    double s = 0.0, u = 0.0;
                    for (int l = 0; l < 8; l++) s += st[r].s[l], u += st[r].u[l];
                    const double log2s = log2(s);
                    logprob[c0 + r] = (float)((target_z[r] - (double)row_max[r] * scale2 - log2s) * ln2);
                    entropy[c0 + r] = (float)((log2s - u / s) * ln2);
                }
            }
            _tile_release();
        }
    }
    return 1;
}
