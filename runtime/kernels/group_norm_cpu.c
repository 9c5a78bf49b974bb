/* GroupNorm followed by SiLU, bf16, for x86-64 CPUs with AVX512-BF16 (runtime/kernels/group_norm_cpu.py).
 *
 * out = silu((x - mean_g) / sqrt(var_g + eps) * weight[c] + bias[c]) over contiguous NCHW x, the
 * statistics of each (batch, group) in fp32 over two passes (mean, then centred squares), the
 * result rounded to bf16 once. Eager bf16 rounds after the norm and again after the SiLU, and reads
 * and writes the normed intermediate.
 */
#include "cpu_math.h"
#include <immintrin.h>
#include <stdint.h>


static inline float bf16_to_float(uint16_t v) {
    union { uint32_t u; float f; } bits = {(uint32_t)v << 16};
    return bits.f;
}


#define GN_T uint16_t
#define GN_LOAD(at, m) load_bf16(at, m)
#define GN_STORE(at, m, v) _mm256_mask_storeu_epi16(at, m, (__m256i)_mm512_cvtneps_pbh(v))
#define GN_SCALAR(v) bf16_to_float(v)
#define GN_NCHW dr_group_norm_silu_bf16
#define GN_NHWC dr_group_norm_silu_nhwc_bf16
#include "group_norm_drive.h"
