/* GroupNorm followed by SiLU, fp32, for x86-64 CPUs with AVX-512 (no bf16 needed; runtime/kernels/group_norm_cpu.py).
 *
 * out = silu((x - mean_g) / sqrt(var_g + eps) * weight[c] + bias[c]) over contiguous or channels-last x,
 * as group_norm_cpu.c computes it in bf16 (group_norm_drive.h): two passes of fp32 statistics, then one
 * pass that normalises, applies the SiLU and writes. Eager PyTorch writes the normed tensor, then reads
 * it again for the SiLU.
 */
#include "cpu_math.h"
#include <immintrin.h>
#include <stdint.h>

#define GN_T float
#define GN_LOAD(at, m) _mm512_maskz_loadu_ps(m, at)
#define GN_STORE(at, m, v) _mm512_mask_storeu_ps(at, m, v)
#define GN_SCALAR(v) (v)
#define GN_NCHW dr_group_norm_silu_f32
#define GN_NHWC dr_group_norm_silu_nhwc_f32
#include "group_norm_drive.h"
