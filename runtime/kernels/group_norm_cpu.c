/* GroupNorm followed by SiLU, bf16, for x86-64 CPUs with AVX512-BF16 (runtime/kernels/group_norm_cpu.py).
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


/* silu(y) = y / (1 + exp(-y)), through recip_ps rather than a division (several times the cost). */
static inline __m512 silu_ps(__m512 y) {
    return _mm512_mul_ps(y, recip_ps(_mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), y)))));
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
                _mm256_mask_storeu_epi16(oc + i, m, (__m256i)_mm512_cvtneps_pbh(silu_ps(y)));
            }
        }
    }
}

#define CHUNK 256  /* pixels per partial sum: a fixed split, so results do not depend on the thread count */

/* Per-channel sums over pixels p0..p1-1 of channels-last rows into part[0..channels-1]: of x, or of
 * (x - mean[c])^2 when mean is given. Pixels are the inner loop (16 channels a register). */
static void chunk_sums(const uint16_t *x, int channels, int64_t p0, int64_t p1, const float *mean, float *part) {
    for (int c = 0; c < channels; c += 16) {
        const __mmask16 m = tail_mask(channels - c);
        const __m512 mu = mean ? _mm512_maskz_loadu_ps(m, mean + c) : _mm512_setzero_ps();
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        int64_t p = p0;
        for (; p + 1 < p1; p += 2) {  /* two chains: the adds' latency, not their rate, bounds one */
            const __m512 a = _mm512_sub_ps(load_bf16(x + p * channels + c, m), mu);
            const __m512 b = _mm512_sub_ps(load_bf16(x + (p + 1) * channels + c, m), mu);
            acc0 = mean ? _mm512_fmadd_ps(a, a, acc0) : _mm512_add_ps(acc0, a);
            acc1 = mean ? _mm512_fmadd_ps(b, b, acc1) : _mm512_add_ps(acc1, b);
        }
        if (p < p1) {
            const __m512 a = _mm512_sub_ps(load_bf16(x + p * channels + c, m), mu);
            acc0 = mean ? _mm512_fmadd_ps(a, a, acc0) : _mm512_add_ps(acc0, a);
        }
        _mm512_mask_storeu_ps(part + c, m, _mm512_add_ps(acc0, acc1));
    }
}

/* The sums of the chunks' partials (in chunk order) per group, for one batch item. */
static void group_totals(const float *part, int64_t chunks, int channels, int groups, double *total) {
    const int per_group = channels / groups;
    for (int g = 0; g < groups; g++) total[g] = 0.0;
    for (int64_t k = 0; k < chunks; k++)
        for (int c = 0; c < channels; c++) total[c / per_group] += part[k * channels + c];
}

/* The same for channels-last x (batch, hw, channels): per-channel sums over fixed chunks of pixels,
 * in parallel, reduced to groups (two passes: mean, then centred squares), then one pass over pixel
 * rows. scratch: 4 * channels floats per batch item; part: batch * ceil(hw / CHUNK) * channels floats. */
void dr_group_norm_silu_nhwc_bf16(const uint16_t *x, const uint16_t *weight, const uint16_t *bias, uint16_t *out,
                                  int batch, int channels, int64_t hw, int groups, float eps, float *scratch,
                                  float *part, int threads) {
    const int per_group = channels / groups;
    const double count = (double)per_group * (double)hw;
    const int64_t chunks = (hw + CHUNK - 1) / CHUNK, tasks = (int64_t)batch * chunks;
#pragma omp parallel num_threads(threads)
    {
        for (int pass = 0; pass < 2; pass++) {
#pragma omp for schedule(static)
            for (int64_t t = 0; t < tasks; t++) {
                const int b = (int)(t / chunks);
                const int64_t k = t % chunks, p1 = (k + 1) * CHUNK < hw ? (k + 1) * CHUNK : hw;
                const float *mean = pass ? scratch + (int64_t)b * 4 * channels + channels : 0;
                chunk_sums(x + (int64_t)b * hw * channels, channels, k * CHUNK, p1, mean, part + t * channels);
            }  /* implicit barrier */
#pragma omp for schedule(static)
            for (int b = 0; b < batch; b++) {
                float *mean = scratch + (int64_t)b * 4 * channels + channels, *scale = mean + channels,
                      *shift = scale + channels;
                double total[groups];
                group_totals(part + (int64_t)b * chunks * channels, chunks, channels, groups, total);
                for (int c = 0; c < channels; c++) {
                    const int g = c / per_group;
                    if (pass == 0) {
                        mean[c] = (float)(total[g] / count);
                    } else {
                        const float rstd = 1.0f / sqrtf((float)(total[g] / count) + eps);
                        scale[c] = rstd * bf16_to_float(weight[c]);
                        shift[c] = bf16_to_float(bias[c]) - mean[c] * scale[c];
                    }
                }
            }  /* implicit barrier */
        }
#pragma omp for schedule(static)
        for (int64_t row = 0; row < (int64_t)batch * hw; row++) {
            const float *scale = scratch + (row / hw) * 4 * channels + 2 * channels, *shift = scale + channels;
            for (int c = 0; c < channels; c += 16) {
                const __mmask16 m = tail_mask(channels - c);
                const __m512 y = _mm512_fmadd_ps(load_bf16(x + row * channels + c, m),
                                                 _mm512_maskz_loadu_ps(m, scale + c), _mm512_maskz_loadu_ps(m, shift + c));
                _mm256_mask_storeu_epi16(out + row * channels + c, m, (__m256i)_mm512_cvtneps_pbh(silu_ps(y)));
            }
        }
    }
}
