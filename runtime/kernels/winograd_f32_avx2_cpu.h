/* The entry points of winograd_f32_avx2_cpu.c: their one declaration (the same names and arguments as
 * winograd_f32_cpu.h, so runtime/kernels/winograd_f32_cpu.py binds whichever of the two the CPU runs).
 * cpu_build.py binds them with ctypes from this file, and the compiler checks the definitions against it.
 * needs: avx2
 */
#pragma once
#include <stdint.h>

void dr_winograd_conv3x3_f32(const float *x, const float *up, const float *bias, const float *res, float *y,
                             float *scratch, int n_batch, int h, int w, int c, int co, int64_t group, int col_parts,
                             int threads);
void dr_winograd_weight_f32(const float *w, float *u, int co, int ci, int threads);
