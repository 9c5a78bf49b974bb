/* The feed-forward's GEGLU projection in one kernel, fp32, for x86-64 CPUs with AVX-512 (no bf16 needed;
 * runtime/kernels/linear_geglu_cpu.py packs the weight).
 *
 * out[r, j] = (x[r] . W[j] + b[j]) * gelu(x[r] . W[d + j] + b[d + j]) for j < d, as linear_geglu_cpu.c
 * computes it in bf16: per block of 16 output columns the 16 value and 16 gate columns are multiplied
 * together (FMAs, fp32 sums), the bias and the exact GELU (gelu_math.h) applied on the sums. Eager PyTorch
 * writes the (rows, 2d) projection (after copying the bias into it), then the GELU, then the product.
 */
#include "cpu_math.h"
#include "gelu_math.h"
#include "linear_geglu_drive.h"
#include <immintrin.h>
#include <stdint.h>

#define CHUNK 64                  /* input columns summed in registers before they join the running sum: */
                                  /* sums of CHUNK terms, then of k / CHUNK, err less than one sum of k */

/* Output columns 16 jb.. 16 jb + 15 of ``rows`` (at most WR) rows from ``x0`` (row stride k); a block of
 * fewer rows repeats its last row in the spare accumulators and stores only its own. k >= 1. */
static void block(const void *x_at, int rows, int k, const void *w_at, const void *bias_at, int d, int jb,
                  void *out_at, const void *h_at, const void *hw_at, int r) {
    const float *x0 = x_at, *wp = w_at, *bias = bias_at, *h0 = h_at, *hw = hw_at;
    float *out0 = out_at;
    const float *row[WR];
    for (int r = 0; r < WR; r++) row[r] = x0 + (int64_t)(r < rows ? r : rows - 1) * k;
    float total[WR][2][16] __attribute__((aligned(64)));
    for (int i0 = 0; i0 < k; i0 += CHUNK) {
        const int i1 = i0 + CHUNK < k ? i0 + CHUNK : k;
        __m512 acc[WR][2];
#pragma GCC unroll 8
        for (int r = 0; r < WR; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        for (int i = i0; i < i1; i++) {
            const __m512 value = _mm512_loadu_ps(wp + (int64_t)i * 32);
            const __m512 gate = _mm512_loadu_ps(wp + (int64_t)i * 32 + 16);
#pragma GCC unroll 8
            for (int r = 0; r < WR; r++) {
                const __m512 a = _mm512_set1_ps(row[r][i]);
                acc[r][0] = _mm512_fmadd_ps(a, value, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(a, gate, acc[r][1]);
            }
        }
        for (int r = 0; r < WR; r++)
            for (int h = 0; h < 2; h++)
                _mm512_store_ps(total[r][h], i0 ? _mm512_add_ps(_mm512_load_ps(total[r][h]), acc[r][h]) : acc[r][h]);
    }
    if (r) {  /* the low-rank term, one more chunk: h's columns against hw's */
        __m512 acc[WR][2];
#pragma GCC unroll 8
        for (int i = 0; i < WR; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
        for (int q = 0; q < r; q++) {
            const __m512 value = _mm512_loadu_ps(hw + (int64_t)q * 32);
            const __m512 gate = _mm512_loadu_ps(hw + (int64_t)q * 32 + 16);
#pragma GCC unroll 8
            for (int i = 0; i < WR; i++) {
                const __m512 a = _mm512_set1_ps(h0[(int64_t)(i < rows ? i : rows - 1) * r + q]);
                acc[i][0] = _mm512_fmadd_ps(a, value, acc[i][0]);
                acc[i][1] = _mm512_fmadd_ps(a, gate, acc[i][1]);
            }
        }
        for (int i = 0; i < WR; i++)
            for (int h = 0; h < 2; h++)
                _mm512_store_ps(total[i][h], k ? _mm512_add_ps(_mm512_load_ps(total[i][h]), acc[i][h]) : acc[i][h]);
    }
    const __m512 bv = bias ? _mm512_loadu_ps(bias + 16 * jb) : _mm512_setzero_ps();
    const __m512 bg = bias ? _mm512_loadu_ps(bias + d + 16 * jb) : _mm512_setzero_ps();
    for (int r = 0; r < rows; r++) {
        const __m512 value = _mm512_add_ps(_mm512_load_ps(total[r][0]), bv);
        const __m512 gate = _mm512_add_ps(_mm512_load_ps(total[r][1]), bg);
        _mm512_storeu_ps(out0 + (int64_t)r * d + 16 * jb, _mm512_mul_ps(value, gelu_ps(gate)));
    }
}

/* x (m, k) row-major; wp the packed weight (d / 16, k, 32): for each block of 16 output columns and each
 * input column, the 16 value then the 16 gate weights; bias (2 d) or NULL; out (m, d). Work split:
 * linear_geglu_drive.h. */
void dr_linear_geglu_f32(const float *x, const float *wp, const float *bias, float *out, int64_t m, int k, int d,
                         const float *h, const float *hw, int r, int threads) {
    linear_geglu_drive((const char *)x, (const char *)wp, bias, (char *)out, m, k, d, (int64_t)k * 32, sizeof(float),
                       threads, block, (const char *)h, (const char *)hw, r);
}
