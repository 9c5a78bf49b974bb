/* GroupNorm followed by SiLU, bf16, for x86-64 CPUs with AVX512-BF16 (kernels/group_norm_cpu.py).
 *
 * out = silu((x - mean_g) / sqrt(var_g + eps) * weight[c] + bias[c]) over contiguous NCHW x, the
 * statistics of each (batch, group) in fp32 over two passes (mean, then centred squares), the
 * result rounded to bf16 once. Eager bf16 rounds after the norm and again after the SiLU, and reads
 * and writes the normed intermediate.
 */
#include "cpu_math.h"
#include <immintrin.h>
#include <math.h>
#include <stdint.h>


static inline float bf16_to_float(uint16_t v) {
    union { uint32_t u; float f; } bits = {(uint32_t)v << 16};
    return bits.f;
}


void dr_group_norm_silu_bf16(const uint16_t *x, const uint16_t *weight, const uint16_t *bias, uint16_t *out,
                             int batch, int channels, int64_t hw, int groups, float eps, int threads) {
    const int per_group = channels / groups;
    const int64_t n = (int64_t)per_group * hw;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int task = 0; task < batch * groups; task++) {
        const uint16_t *xg = x + (int64_t)task * n;
        uint16_t *og = out + (int64_t)task * n;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < n; i += 16) acc = _mm512_add_ps(acc, load_bf16(xg + i, tail_mask(n - i)));
        const float mean = _mm512_reduce_add_ps(acc) / (float)n;
        const __m512 mean_v = _mm512_set1_ps(mean);
        acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < n; i += 16) {
            const __mmask16 m = tail_mask(n - i);
            const __m512 c = _mm512_maskz_sub_ps(m, load_bf16(xg + i, m), mean_v);
            acc = _mm512_fmadd_ps(c, c, acc);
        }
        const float rstd = 1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)n + eps);
        const int g = task % groups;
        for (int ci = 0; ci < per_group; ci++) {
            const int c = g * per_group + ci;
            const float scale = rstd * bf16_to_float(weight[c]);
            const __m512 a = _mm512_set1_ps(scale);
            const __m512 b = _mm512_set1_ps(bf16_to_float(bias[c]) - mean * scale);
            const uint16_t *xc = xg + (int64_t)ci * hw;
            uint16_t *oc = og + (int64_t)ci * hw;
            for (int64_t i = 0; i < hw; i += 16) {
                const __mmask16 m = tail_mask(hw - i);
                const __m512 y = _mm512_fmadd_ps(load_bf16(xc + i, m), a, b);
                const __m512 s = _mm512_div_ps(y, _mm512_add_ps(_mm512_set1_ps(1.0f),
                                                                exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), y))));
                _mm256_mask_storeu_epi16(oc + i, m, (__m256i)_mm512_cvtneps_pbh(s));
            }
        }
    }
}

/* The same for channels-last x (batch, hw, channels): per-channel sums over pixels reduced to groups
 * (two passes, fp32), then one pass over pixel rows. scratch: 4 * channels floats per batch item. */
void dr_group_norm_silu_nhwc_bf16(const uint16_t *x, const uint16_t *weight, const uint16_t *bias, uint16_t *out,
                                  int batch, int channels, int64_t hw, int groups, float eps, float *scratch,
                                  int threads) {
    const int per_group = channels / groups;
    const float count = (float)per_group * (float)hw;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int b = 0; b < batch; b++) {
        const uint16_t *xb = x + (int64_t)b * hw * channels;
        float *sum = scratch + (int64_t)b * 4 * channels, *mean = sum + channels, *scale = mean + channels,
              *shift = scale + channels;
        for (int c = 0; c < channels; c++) sum[c] = 0.0f;
        for (int64_t p = 0; p < hw; p++)
            for (int c = 0; c < channels; c += 16) {
                const __mmask16 m = tail_mask(channels - c);
                _mm512_mask_storeu_ps(sum + c, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, sum + c),
                                                                load_bf16(xb + p * channels + c, m)));
            }
        for (int g = 0; g < groups; g++) {
            float s = 0.0f;
            for (int c = g * per_group; c < (g + 1) * per_group; c++) s += sum[c];
            for (int c = g * per_group; c < (g + 1) * per_group; c++) mean[c] = s / count;
        }
        for (int c = 0; c < channels; c++) sum[c] = 0.0f;
        for (int64_t p = 0; p < hw; p++)
            for (int c = 0; c < channels; c += 16) {
                const __mmask16 m = tail_mask(channels - c);
                const __m512 d = _mm512_maskz_sub_ps(m, load_bf16(xb + p * channels + c, m), _mm512_maskz_loadu_ps(m, mean + c));
                _mm512_mask_storeu_ps(sum + c, m, _mm512_fmadd_ps(d, d, _mm512_maskz_loadu_ps(m, sum + c)));
            }
        for (int g = 0; g < groups; g++) {
            float s = 0.0f;
            for (int c = g * per_group; c < (g + 1) * per_group; c++) s += sum[c];
            const float rstd = 1.0f / sqrtf(s / count + eps);
            for (int c = g * per_group; c < (g + 1) * per_group; c++) {
                scale[c] = rstd * bf16_to_float(weight[c]);
                shift[c] = bf16_to_float(bias[c]) - mean[c] * scale[c];
            }
        }
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t row = 0; row < (int64_t)batch * hw; row++) {
        const float *scale = scratch + (row / hw) * 4 * channels + 2 * channels, *shift = scale + channels;
        for (int c = 0; c < channels; c += 16) {
            const __mmask16 m = tail_mask(channels - c);
            const __m512 y = _mm512_fmadd_ps(load_bf16(x + row * channels + c, m), _mm512_maskz_loadu_ps(m, scale + c),
                                             _mm512_maskz_loadu_ps(m, shift + c));
            const __m512 s = _mm512_div_ps(y, _mm512_add_ps(_mm512_set1_ps(1.0f),
                                                            exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), y))));
            _mm256_mask_storeu_epi16(out + row * channels + c, m, (__m256i)_mm512_cvtneps_pbh(s));
        }
    }
}
