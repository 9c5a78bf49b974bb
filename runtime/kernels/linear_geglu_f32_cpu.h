/* The entry points of linear_geglu_f32_cpu.c: their one declaration. cpu_build.py binds them with ctypes from this file
 * (cpu_sources.py parses it: scalars int, int64_t, float, double; any pointer passes as void *), and the
 * compiler checks the definitions against it (the build force-includes it: -include linear_geglu_f32_cpu.h).
 * needs: avx512
 */
#pragma once
#include <stdint.h>

void dr_linear_geglu_f32(const float *x, const float *wp, const float *bias, float *out, int64_t m, int k, int d,
                         const float *h, const float *hw, int r, int threads);
