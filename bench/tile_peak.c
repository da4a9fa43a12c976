/* What the AMX tile unit does on this machine, per core, without opd's kernel around it (bench/NOTES.md, session
 * 26): bf16 tile products (tdpbf16ps, 16 x 32 by 32 x 16 into 16 x 16 fp32 sums: 16,384 FLOPs) on tiles already
 * loaded, then the 2 x 2 blocking opd's kernel uses (four sum tiles, each loaded tile used twice) with its loads
 * from working sets of growing size: every tile from it, or only the row tiles (the column tiles in L1, as the
 * kernel keeps a pair of weight tiles). Every thread runs the same loops on its own core and prints its own rates.
 * The tiles hold random bf16 values, as a model's do: on zeros the loops with loads ran 15-25% faster (session 28:
 * row tiles from 32 KB 3,304 against 2,677 GFLOP/s; the products alone do not move).
 *
 *     gcc -O2 -march=native -fopenmp bench/tile_peak.c -o /tmp/tile_peak && OMP_NUM_THREADS=2 /tmp/tile_peak
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../src/opd/csrc/amx.h"

#define TILES __attribute__((target("avx512f,avx512bf16,amx-tile,amx-bf16")))

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

TILES static void configure(void) {
    TileConfig c __attribute__((aligned(64)));
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 8; i++) c.rows[i] = 16, c.colsb[i] = 64;
    _tile_loadconfig(&c);
}

TILES static void run(int thread) {
    const long n = 10000000, bytes = 16L << 20;
    uint16_t *buf = aligned_alloc(64, bytes);
    unsigned seed = 12345u + (unsigned)thread;
    for (long i = 0; i < bytes / 2; i++) {  /* bf16 of magnitude 0.5-1, either sign */
        seed = seed * 1103515245u + 12345u;
        buf[i] = (uint16_t)(0x3F00 + ((seed >> 16) & 0xFF) + ((seed >> 8) & 0x8000));
    }
    configure();
    char line[4096];
    int at = snprintf(line, sizeof line, "thread %d:", thread);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_loadd(4, buf, 64);
    _tile_loadd(5, buf, 64);
    _tile_loadd(6, buf, 64);
    _tile_loadd(7, buf, 64);
    double t = now();
    for (long i = 0; i < n; i++) {
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    double dt = now() - t;
    at += snprintf(line + at, sizeof line - at, " products alone %.0f GFLOP/s (%.2f ns each);", 4.0 * n * 16384 / dt / 1e9,
                   dt / (4.0 * n) * 1e9);
    const long sizes[] = {32L << 10, 256L << 10, 1L << 20, 16L << 20};
    for (int s = 0; s < 4; s++) {
        const long tiles = sizes[s] / 1024, iters = n / 8;
        for (int rows_only = 0; rows_only < 2; rows_only++) {
            long j = 0;
            t = now();
            for (long i = 0; i < iters; i++) {
                const uint16_t *b0 = rows_only ? buf + (i % 4) * 512 : buf + ((j + 1) % tiles) * 512;
                const uint16_t *b1 = rows_only ? buf + (i % 4 + 4) * 512 : buf + ((j + 3) % tiles) * 512;
                _tile_stream_loadd(4, buf + (j % tiles) * 512, 64);
                _tile_loadd(6, b0, 64);
                _tile_dpbf16ps(0, 4, 6);
                _tile_stream_loadd(5, buf + ((j + 2) % tiles) * 512, 64);
                _tile_dpbf16ps(2, 5, 6);
                _tile_loadd(7, b1, 64);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(3, 5, 7);
                j += 4;
            }
            dt = now() - t;
            at += snprintf(line + at, sizeof line - at, " %s from %ld KB %.0f;", rows_only ? "row tiles" : "all tiles",
                           sizes[s] >> 10, 4.0 * iters * 16384 / dt / 1e9);
        }
    }
    _tile_release();
    free(buf);
    printf("%s\n", line);
}

int main(void) {
    if (!amx_request_state()) {
        fprintf(stderr, "no AMX tile state here (a CPU without AMX, or Linux refused it)\n");
        return 1;
    }
    #pragma omp parallel
    run(omp_get_thread_num());
    return 0;
}
