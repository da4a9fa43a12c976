/* What every AMX kernel of opd needs: the tile configuration's layout (palette 1) and the tile state, which Linux
 * hands out only to processes that ask (ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA; once per process, asking again
 * is harmless). int8_gemv.c (int8 products) and attention.c (bf16 attention) include it. */
#pragma once
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* 1 where this process may use the tile unit from now on, else 0 */
static inline int amx_request_state(void) { return syscall(SYS_arch_prctl, 0x1023, 18) == 0; }
