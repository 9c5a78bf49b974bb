/* The entry points of group_norm_f32_cpu.c: their one declaration. cpu_build.py binds them with ctypes from this file
 * (cpu_sources.py parses it: scalars int, int64_t, float, double; any pointer passes as void *), and the
 * compiler checks the definitions against it (the build force-includes it: -include group_norm_f32_cpu.h).
 * needs: avx512
 */
#pragma once
#include <stdint.h>

void dr_group_norm_silu_f32(const float *x, const float *weight, const float *bias, float *out,
                             int batch, int channels, int64_t hw, int groups, float eps, int threads);
void dr_group_norm_silu_nhwc_f32(const float *x, const float *weight, const float *bias, float *out,
                                  int batch, int channels, int64_t hw, int groups, float eps, float *scratch,
                                  float *part, int threads);
