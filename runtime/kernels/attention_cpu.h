/* The entry points of attention_cpu.c: their one declaration. cpu_build.py binds them with ctypes from this file
 * (cpu_sources.py parses it: scalars int, int64_t, float, double; any pointer passes as void *), and the
 * compiler checks the definitions against it (the build force-includes it: -include attention_cpu.h).
 * needs: avx512_bf16
 */
#pragma once
#include <stdint.h>

int dr_attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *o, int b, int h,
                      int tq, int tk, int d, const int64_t *qs, const int64_t *ks, const int64_t *vs,
                      const int64_t *os, float scale, int threads);
