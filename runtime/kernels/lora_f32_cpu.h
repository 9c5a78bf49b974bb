/* The entry point of lora_f32_cpu.c: its one declaration. cpu_build.py binds it with ctypes from this file
 * (cpu_sources.py parses it), and the build force-includes it, so the definition must agree.
 * needs: avx512
 */
#pragma once
#include <stdint.h>

int dr_lora_term_f32(const float *x, int64_t ldx, const float *down, const float *up_t, float *out, int64_t ldo,
                     int64_t m, int k, int r, int n, float scale, int threads);
