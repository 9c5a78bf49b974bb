/* The entry points of winograd_f32_cpu.c: their one declaration. cpu_build.py binds them with ctypes from this file
 * (cpu_sources.py parses it: scalars int, int64_t, float, double; any pointer passes as void *), and the
 * compiler checks the definitions against it (the build force-includes it: -include winograd_f32_cpu.h).
 * needs: avx512
 */
#pragma once
#include <stdint.h>

void dr_winograd_conv3x3_f32(const float *x, const float *up, const float *bias, const float *res, float *y,
                             float *scratch, int n_batch, int h, int w, int c, int co, int64_t group, int col_parts,
                             int threads);
void dr_winograd_weight_f32(const float *w, float *u, int co, int ci, int threads);
