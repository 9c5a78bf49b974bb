/* The entry points of geglu_cpu.c: their one declaration. cpu_build.py binds them with ctypes from this file
 * (cpu_sources.py parses it: scalars int, int64_t, float, double; any pointer passes as void *), and the
 * compiler checks the definitions against it (the build force-includes it: -include geglu_cpu.h).
 * needs: avx512_bf16
 */
#pragma once
#include <stdint.h>

void dr_geglu_bf16(const uint16_t *proj, uint16_t *out, int64_t rows, int n, int64_t proj_stride,
                   int64_t out_stride, int threads);
