/* The GroupNorm + SiLU kernels shared by group_norm_cpu.c (bf16) and group_norm_f32_cpu.c (fp32).
 *
 * Included once by each after it defines GN_T (the element type), GN_LOAD(at, mask) (up to 16 elements
 * as fp32 lanes), GN_STORE(at, mask, v) (the lanes, rounded to GN_T), GN_SCALAR(v) (one element as a float),
 * and GN_NCHW / GN_NHWC (the names of the two entry points). Statistics in fp32 over two passes (mean,
 * then centred squares), the result rounded to GN_T once: the same instructions for both types but the
 * loads and stores.
 */
#include "cpu_math.h"
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define BLOCK 1024  /* elements per register sum in the contiguous statistics (a multiple of 16) */

/* silu(y) = y / (1 + exp(-y)), through recip_ps rather than a division (several times the cost). */
static inline __m512 silu_ps(__m512 y) {
    return _mm512_mul_ps(y, recip_ps(_mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), y)))));
}

void GN_NCHW(const GN_T *x, const GN_T *weight, const GN_T *bias, GN_T *out,
             int batch, int channels, int64_t hw, int groups, float eps, int threads) {
    const int per_group = channels / groups;
    const int64_t n = (int64_t)per_group * hw;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int task = 0; task < batch * groups; task++) {
        const GN_T *xg = x + (int64_t)task * n;
        GN_T *og = out + (int64_t)task * n;
        /* sums of BLOCK elements in registers, then of the blocks in double: the error of a short sum */
        double total = 0.0;
        for (int64_t i0 = 0; i0 < n; i0 += BLOCK) {
            const int64_t i1 = i0 + BLOCK < n ? i0 + BLOCK : n;
            __m512 acc = _mm512_setzero_ps();
            for (int64_t i = i0; i < i1; i += 16) acc = _mm512_add_ps(acc, GN_LOAD(xg + i, tail_mask(i1 - i)));
            total += _mm512_reduce_add_ps(acc);
        }
        const float mean = (float)(total / (double)n);
        const __m512 mean_v = _mm512_set1_ps(mean);
        total = 0.0;
        for (int64_t i0 = 0; i0 < n; i0 += BLOCK) {
            const int64_t i1 = i0 + BLOCK < n ? i0 + BLOCK : n;
            __m512 acc = _mm512_setzero_ps();
            for (int64_t i = i0; i < i1; i += 16) {
                const __mmask16 m = tail_mask(i1 - i);
                const __m512 c = _mm512_maskz_sub_ps(m, GN_LOAD(xg + i, m), mean_v);
                acc = _mm512_fmadd_ps(c, c, acc);
            }
            total += _mm512_reduce_add_ps(acc);
        }
        const float rstd = 1.0f / sqrtf((float)(total / (double)n) + eps);
        const int g = task % groups;
        for (int ci = 0; ci < per_group; ci++) {
            const int c = g * per_group + ci;
            const float scale = rstd * GN_SCALAR(weight[c]);
            const __m512 a = _mm512_set1_ps(scale);
            const __m512 b = _mm512_set1_ps(GN_SCALAR(bias[c]) - mean * scale);
            const GN_T *xc = xg + (int64_t)ci * hw;
            GN_T *oc = og + (int64_t)ci * hw;
            for (int64_t i = 0; i < hw; i += 16) {
                const __mmask16 m = tail_mask(hw - i);
                const __m512 y = _mm512_fmadd_ps(GN_LOAD(xc + i, m), a, b);
                GN_STORE(oc + i, m, silu_ps(y));
            }
        }
    }
}

#define CHUNK 256  /* pixels per partial sum: a fixed split, so results do not depend on the thread count */

/* Per-channel sums over pixels p0..p1-1 of channels-last rows into part[0..channels-1]: of x, or of
 * (x - mean[c])^2 when mean is given. Pixels are the inner loop (16 channels a register). */
static void chunk_sums(const GN_T *x, int channels, int64_t p0, int64_t p1, const float *mean, float *part) {
    for (int c = 0; c < channels; c += 16) {
        const __mmask16 m = tail_mask(channels - c);
        const __m512 mu = mean ? _mm512_maskz_loadu_ps(m, mean + c) : _mm512_setzero_ps();
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        int64_t p = p0;
        for (; p + 1 < p1; p += 2) {  /* two chains: the adds' latency, not their rate, bounds one */
            const __m512 a = _mm512_sub_ps(GN_LOAD(x + p * channels + c, m), mu);
            const __m512 b = _mm512_sub_ps(GN_LOAD(x + (p + 1) * channels + c, m), mu);
            acc0 = mean ? _mm512_fmadd_ps(a, a, acc0) : _mm512_add_ps(acc0, a);
            acc1 = mean ? _mm512_fmadd_ps(b, b, acc1) : _mm512_add_ps(acc1, b);
        }
        if (p < p1) {
            const __m512 a = _mm512_sub_ps(GN_LOAD(x + p * channels + c, m), mu);
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
void GN_NHWC(const GN_T *x, const GN_T *weight, const GN_T *bias, GN_T *out,
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
                        scale[c] = rstd * GN_SCALAR(weight[c]);
                        shift[c] = GN_SCALAR(bias[c]) - mean[c] * scale[c];
                    }
                }
            }  /* implicit barrier */
        }
#pragma omp for schedule(static)
        for (int64_t row = 0; row < (int64_t)batch * hw; row++) {
            const float *scale = scratch + (row / hw) * 4 * channels + 2 * channels, *shift = scale + channels;
            for (int c = 0; c < channels; c += 16) {
                const __mmask16 m = tail_mask(channels - c);
                const __m512 y = _mm512_fmadd_ps(GN_LOAD(x + row * channels + c, m),
                                                 _mm512_maskz_loadu_ps(m, scale + c), _mm512_maskz_loadu_ps(m, shift + c));
                GN_STORE(out + row * channels + c, m, silu_ps(y));
            }
        }
    }
}
