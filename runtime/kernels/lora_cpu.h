/* The entry point of lora_cpu.c: its one declaration. cpu_build.py binds it with ctypes from this file
 * (cpu_sources.py parses it), and the build force-includes it, so the definition must agree.
 * needs: avx512_bf16
 */
#pragma once
#include <stdint.h>

int dr_lora_term_bf16(const uint16_t *x, int64_t ldx, const uint16_t *down, const uint16_t *up_pairs, uint16_t *out,
                      int64_t ldo, int64_t m, int k, int r, int n, float scale, int threads);
