/* What every AMX kernel of opd needs: the tile configuration's layout (palette 1) and the tile state, which Linux
 * hands out only to processes that ask (ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA; once per process, asking again
 * is harmless). int8_gemv.c (int8 products), attention.c (bf16 attention) and gemm_amx.c (bf16 products) include
 * it. */
#pragma once
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* 1 where this process may use the tile unit from now on, else 0 */
static inline int amx_request_state(void) { return syscall(SYS_arch_prctl, 0x1023, 18) == 0; }

/* every tile 16 rows of 64 bytes (palette 1): the bf16 kernels' one configuration */
__attribute__((target("amx-tile"))) static inline void tile_config_16x64(void) {
    TileConfig cfg __attribute__((aligned(64)));
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 8; i++) cfg.rows[i] = 16, cfg.colsb[i] = 64;
    _tile_loadconfig(&cfg);
}
