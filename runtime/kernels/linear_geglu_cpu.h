/* The entry points of linear_geglu_cpu.c: their one declaration. cpu_build.py binds them with ctypes from this file
 * (cpu_sources.py parses it: scalars int, int64_t, float, double; any pointer passes as void *), and the
 * compiler checks the definitions against it (the build force-includes it: -include linear_geglu_cpu.h).
 * needs: avx512_bf16
 */
#pragma once
#include <stdint.h>

void dr_linear_geglu_bf16(const uint16_t *x, const uint16_t *wp, const uint16_t *bias, uint16_t *out, int64_t m,
                          int k, int d, const uint16_t *h, const uint16_t *hw, int r, int threads);
