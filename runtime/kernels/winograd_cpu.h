/* The entry points of winograd_cpu.c: their one declaration. cpu_build.py binds them with ctypes from this file
 * (cpu_sources.py parses it: scalars int, int64_t, float, double; any pointer passes as void *), and the
 * compiler checks the definitions against it (the build force-includes it: -include winograd_cpu.h).
 * needs: avx512_bf16
 */
#pragma once
#include <stdint.h>

void dr_winograd_conv3x3_bf16(const uint16_t *x, const uint16_t *up, const uint16_t *bias, const uint16_t *res,
                              uint16_t *y, uint16_t *scratch, int n_batch, int h, int w, int c, int co, int64_t group,
                              int col_parts, int threads);
void dr_winograd_up2_conv3x3_bf16(const uint16_t *x, const uint16_t *up, const uint16_t *bias, uint16_t *y,
                                  uint16_t *scratch, int n_batch, int h, int w, int c, int co, int64_t group,
                                  int col_parts, int threads);
void dr_winograd_weight_bf16(const uint16_t *w, uint16_t *u, int co, int ci, int up2, int threads);
