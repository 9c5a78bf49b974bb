/* The entry points of group_norm_cpu.c: their one declaration. cpu_build.py binds them with ctypes from this file
 * (cpu_sources.py parses it: scalars int, int64_t, float, double; any pointer passes as void *), and the
 * compiler checks the definitions against it (the build force-includes it: -include group_norm_cpu.h).
 * needs: avx512_bf16
 */
#pragma once
#include <stdint.h>

void dr_group_norm_silu_bf16(const uint16_t *x, const uint16_t *weight, const uint16_t *bias, uint16_t *out,
                             int batch, int channels, int64_t hw, int groups, float eps, int threads);
void dr_group_norm_silu_nhwc_bf16(const uint16_t *x, const uint16_t *weight, const uint16_t *bias, uint16_t *out,
                                  int batch, int channels, int64_t hw, int groups, float eps, float *scratch,
                                  float *part, int threads);
