/* The feed-forward's GEGLU projection in one kernel, bf16, for x86-64 CPUs with AVX512-BF16
 * (runtime/kernels/linear_geglu_cpu.py packs the weight).
 *
 * out[r, j] = (x[r] . W[j] + b[j]) * gelu(x[r] . W[d + j] + b[d + j]) for j < d: the linear to 2d
 * columns and the GEGLU activation without writing the (rows, 2d) projection. Each block of 16
 * output columns multiplies its 16 value and 16 gate columns together (vdpbf16ps, fp32 sums, never
 * rounded), adds the bias, applies the exact GELU (gelu_math.h) and rounds once to bf16: the
 * unfused path rounds the projection to bf16 first, then the product.
 */
#include "cpu_math.h"
#include "gelu_math.h"
#include "linear_geglu_drive.h"
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

static inline __m512bh broadcast_pair(const uint16_t *at) {
    uint32_t pair;
    memcpy(&pair, at, 4);
    return (__m512bh)_mm512_set1_epi32((int)pair);
}

/* Output columns 16 jb.. 16 jb + 15 of ``rows`` (at most WR) rows from ``x0`` (row stride k). A block of
 * fewer rows repeats its last row in the spare lanes of the products and stores only its own. */
static void block(const void *x_at, int rows, int k, const void *w_at, const void *bias_at, int d, int jb,
                  void *out_at, const void *h_at, const void *hw_at, int r) {
    const uint16_t *x0 = x_at, *wp = w_at, *bias = bias_at, *h0 = h_at, *hw = hw_at;
    uint16_t *out0 = out_at;
    const int pairs = k / 2;
    const uint16_t *row[WR];
    for (int r = 0; r < WR; r++) row[r] = x0 + (int64_t)(r < rows ? r : rows - 1) * k;
    __m512 acc[WR][2];
#pragma GCC unroll 8
    for (int r = 0; r < WR; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int p = 0; p < pairs; p++) {
        const __m512bh value = (__m512bh)_mm512_loadu_si512(wp + (int64_t)p * 64);
        const __m512bh gate = (__m512bh)_mm512_loadu_si512(wp + (int64_t)p * 64 + 32);
#pragma GCC unroll 8
        for (int r = 0; r < WR; r++) {
            const __m512bh a = broadcast_pair(row[r] + 2 * p);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, value);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, gate);
        }
    }
    for (int p = 0; p < r / 2; p++) {  /* the low-rank term: h's pairs against hw's, as x's against wp's */
        const __m512bh value = (__m512bh)_mm512_loadu_si512(hw + (int64_t)p * 64);
        const __m512bh gate = (__m512bh)_mm512_loadu_si512(hw + (int64_t)p * 64 + 32);
#pragma GCC unroll 8
        for (int i = 0; i < WR; i++) {
            const __m512bh a = broadcast_pair(h0 + (int64_t)(i < rows ? i : rows - 1) * r + 2 * p);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], a, value);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], a, gate);
        }
    }
    const __m512 bv = bias ? load_bf16(bias + 16 * jb, 0xFFFF) : _mm512_setzero_ps();
    const __m512 bg = bias ? load_bf16(bias + d + 16 * jb, 0xFFFF) : _mm512_setzero_ps();
    for (int r = 0; r < rows; r++) {
        const __m512 y = _mm512_mul_ps(_mm512_add_ps(acc[r][0], bv), gelu_ps(_mm512_add_ps(acc[r][1], bg)));
        _mm256_storeu_si256((__m256i *)(out0 + (int64_t)r * d + 16 * jb), (__m256i)_mm512_cvtneps_pbh(y));
    }
}

/* x (m, k) row-major, k even; wp the packed weight (d / 16, k / 2, 32, 2): for each block of 16 output
 * columns, each pair of input columns, the 16 value then the 16 gate weights, two input columns each;
 * bias (2 d) or NULL; out (m, d); h (m, r) and hw (d / 16, r / 2, 32, 2), r even, a low-rank term added to the
 * projection before the activation (r = 0: none). Work split: linear_geglu_drive.h. */
void dr_linear_geglu_bf16(const uint16_t *x, const uint16_t *wp, const uint16_t *bias, uint16_t *out, int64_t m,
                          int k, int d, const uint16_t *h, const uint16_t *hw, int r, int threads) {
    linear_geglu_drive((const char *)x, (const char *)wp, bias, (char *)out, m, k, d, (int64_t)k / 2 * 64,
                       sizeof(uint16_t), threads, block, (const char *)h, (const char *)hw, r);
}
