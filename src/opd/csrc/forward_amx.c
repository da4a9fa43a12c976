/* A frozen bf16 Llama's decoder layers in one call (opd.llama's AMX forward): gemm_amx.c's products and
 * attention.c's bf16 attention, run by each thread on rows of its own, layer after layer, in one parallel region.
 *
 * Where the threads can take whole sequences each (B a multiple of them, a thread's rows whole tiles), thread t
 * takes the t-th share of the batch through every step of every layer: QKV, attention (a sequence's keys are its
 * own rows), o, the MLP; nothing it reads was written by the other thread, so no step waits for the other. Called
 * step by step from Python, the same work had a barrier after every product and attention, and the Python between
 * them ran on one core while the other waited: the 8 x 256 forward 259 -> 243 ms, 8 x 512 552 -> 532 (medians,
 * in-process A/B, the same bits; bench/NOTES.md, session 29). Other batches take the step-by-step path
 * (opd.llama._amx_causal_hidden). */
#include "gemm_amx.c"
#include "attention.c"

/* one layer's packed weights (cpu_kernels.AmxWeight: the tiles and each tile's output column) */
typedef struct {
    const uint16_t *w;
    const int32_t *cols;
} PackedRef;

typedef struct {
    PackedRef qkv, o, gate_up, down;
} AmxLayer;

/* one call's operands (opd_amx_layers_bf16's arguments), shared by its threads */
typedef struct {
    uint16_t *x, *qkv, *att;
    uint8_t *att_scratch;
    float *scale;
    const AmxLayer *layers;
    const uint16_t *rope_tab;
    int64_t B, L, hidden, H, KV, inter, n_layers, rope_heads, mlp_rows, threads;
    float eps;
} LayersCall;

/* thread t's share of the batch through every layer */
AMXBF16 static void layers_thread(const LayersCall *c, int64_t t) {
    const int64_t L = c->L, hidden = c->hidden, H = c->H, KV = c->KV, inter = c->inter, NQ = (H + 2 * KV) * D;
    const int64_t Lp = (L + 31) & ~(int64_t)31, blocks = (L + QB - 1) / QB;
    const int64_t b0 = c->B / c->threads * t, b1 = b0 + c->B / c->threads, r0 = b0 * L, tiles = (b1 - b0) * L / 16;
    const float att_scale = 1.0f / sqrtf((float)D);
    uint16_t *x = c->x, *qkv = c->qkv, *att = c->att;
    float *scale = c->scale;
    uint8_t *mine = c->att_scratch + opd_attention_bf16_scratch_bytes(L) * t;
    const int64_t per = mlp_chunk_tiles(tiles, c->mlp_rows);
    uint16_t *h = aligned_alloc(64, per * 16 * inter * 2);  /* SiLU x up of a chunk, for every layer's MLP */
    for (int64_t r = r0; r < r0 + tiles * 16; r++) scale[r] = inv_rms16(x + r * hidden, hidden, c->eps);
    for (int64_t i = 0; i < c->n_layers; i++) {
        const AmxLayer *w = c->layers + i;
        float *next_scale = i + 1 < c->n_layers ? scale : NULL;
        const Product pq = {w->qkv.w, hidden, NQ, NQ, OUT_BF16, 0,
                            {w->qkv.cols, c->rope_heads * D / 32, c->rope_tab, L, D, scale}, NULL, 0.0f};
        const Product po = {w->o.w, H * D, hidden, hidden, ADD_BF16, 0, {w->o.cols, 0, NULL, 1, 1, NULL}, scale, c->eps};
        const Mlp mlp = mlp_of(w->gate_up.w, w->gate_up.cols, w->down.w, w->down.cols, hidden, inter, scale, next_scale,
                               c->eps);
        product_rows(&pq, x + r0 * hidden, qkv + r0 * NQ, r0, tiles);
        tile_config_16x64();
        int64_t packed_bj = -1;
        for (int64_t task = b0 * KV * blocks; task < b1 * KV * blocks; task++)
            attention_task(qkv, att, mine, &packed_bj, task, blocks, KV, H / KV, L, Lp, H, att_scale);
        _tile_release();
        product_rows(&po, att + r0 * H * D, x + r0 * hidden, r0, tiles);
        mlp_rows(&mlp, x, r0, tiles, per, h);
    }
    free(h);
}

/* x [B L, hidden] (the residual stream, from the embedding) through n_layers layers in place. QKV packed with RoPE's
 * layout for its first rope_heads heads (rope_tab: cpu_kernels.amx_rope_table [L, 2 D]) and the input norm folded in,
 * gate/up packed with silu_mul and the post-attention norm folded in (opd.llama.frozen_layer_weights); D = 64.
 * Buffers: scale [B L] fp32, qkv [B L, (H + 2 KV) D], att [B L, H D], att_scratch threads x
 * opd_attention_bf16_scratch_bytes(L). Returns 0 (nothing done) where the split does not apply (see above), where
 * OpenMP hands out fewer threads than asked for (a thread limit, a nested region: the shares would leave sequences
 * out), or without the tile state. */
AMXBF16 int opd_amx_layers_bf16(uint16_t *x, int64_t B, int64_t L, int64_t hidden, int64_t H, int64_t KV,
                                int64_t inter, const AmxLayer *layers, int64_t n_layers, int64_t rope_heads,
                                const uint16_t *rope_tab, float eps, float *scale, uint16_t *qkv, uint16_t *att,
                                uint8_t *att_scratch, int64_t mlp_rows, int threads) {
    if (!gemm_amx_granted || !att_amx_granted || threads < 1 || B % threads || (B / threads * L) % 16 || hidden % 32
        || inter % 32 || H % KV)
        return 0;
    const LayersCall call = {x, qkv, att, att_scratch, scale, layers, rope_tab, B, L, hidden, H, KV, inter, n_layers,
                             rope_heads, mlp_rows, threads, eps};
    int short_team = 0;
    #pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        const int64_t t = omp_get_thread_num(), team = omp_get_num_threads();
#else
        const int64_t t = 0, team = 1;
#endif
        if (team != threads) short_team = 1;  /* (every thread of the team sees the same size: none starts) */
        else layers_thread(&call, t);
    }
    return !short_team;
}
