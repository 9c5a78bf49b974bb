/* The feed-forward's GEGLU projection in one kernel, bf16, for x86-64 CPUs with AVX512-BF16
 * (kernels/linear_geglu_cpu.py packs the weight).
 *
 * out[r, j] = (x[r] . W[j] + b[j]) * gelu(x[r] . W[d + j] + b[d + j]) for j < d: the linear to 2d
 * columns and the GEGLU activation without writing the (rows, 2d) projection. Each block of 16
 * output columns multiplies its 16 value and 16 gate columns together (vdpbf16ps, fp32 sums, never
 * rounded), adds the bias, applies the exact GELU (gelu_math.h) and rounds once to bf16: the
 * unfused path rounds the projection to bf16 first, then the product.
 */
#include "cpu_math.h"
#include "gelu_math.h"
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define WR 8                          /* rows per block of the products */
#define GROUP_BYTES (512 * 1024)      /* the input rows one pass over a thread's weight columns serves: */
                                      /* as many as fit in half this CPU's L2 (1 MB), at least WR */

static inline __m512bh broadcast_pair(const uint16_t *at) {
    uint32_t pair;
    memcpy(&pair, at, 4);
    return (__m512bh)_mm512_set1_epi32((int)pair);
}

/* Output columns 16 jb.. 16 jb + 15 of ``rows`` (at most WR) rows from ``x0`` (row stride k). A block of
 * fewer rows repeats its last row in the spare lanes of the products and stores only its own. */
static void block(const uint16_t *x0, int rows, int k, const uint16_t *wp, const uint16_t *bias, int d, int jb,
                  uint16_t *out0) {
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
    const __m512 bv = bias ? load_bf16(bias + 16 * jb, 0xFFFF) : _mm512_setzero_ps();
    const __m512 bg = bias ? load_bf16(bias + d + 16 * jb, 0xFFFF) : _mm512_setzero_ps();
    for (int r = 0; r < rows; r++) {
        const __m512 y = _mm512_mul_ps(_mm512_add_ps(acc[r][0], bv), gelu_ps(_mm512_add_ps(acc[r][1], bg)));
        _mm256_storeu_si256((__m256i *)(out0 + (int64_t)r * d + 16 * jb), (__m256i)_mm512_cvtneps_pbh(y));
    }
}

/* x (m, k) row-major, k even; wp the packed weight (d / 16, k / 2, 32, 2): for each block of 16 output
 * columns, each pair of input columns, the 16 value then the 16 gate weights, two input columns each;
 * bias (2 d) or NULL; out (m, d). The threads split the column blocks; each walks the rows in groups
 * that stay in its L2 while it runs over its weight columns once per group: the weights, read from
 * memory, are read once when all the rows fit (every UNet call at 256x256). Every output is computed
 * by the same instructions whatever the thread count. */
void dr_linear_geglu_bf16(const uint16_t *x, const uint16_t *wp, const uint16_t *bias, uint16_t *out, int64_t m,
                          int k, int d, int threads) {
    const int blocks = d / 16;
    const int parts = threads < blocks ? threads : blocks;
    const int64_t fit = GROUP_BYTES / (2 * (int64_t)k) / WR * WR, group = fit > WR ? fit : WR;
#pragma omp parallel for num_threads(parts) schedule(static, 1)
    for (int part = 0; part < parts; part++) {
        const int jb0 = (int)((int64_t)blocks * part / parts), jb1 = (int)((int64_t)blocks * (part + 1) / parts);
        for (int64_t g0 = 0; g0 < m; g0 += group) {
            const int64_t g1 = g0 + group < m ? g0 + group : m;
            for (int jb = jb0; jb < jb1; jb++) {
                const uint16_t *w = wp + (int64_t)jb * (k / 2) * 64;
                for (int64_t r0 = g0; r0 < g1; r0 += WR)
                    block(x + r0 * k, g1 - r0 < WR ? (int)(g1 - r0) : WR, k, w, bias, d, jb, out + r0 * d);
            }
        }
    }
}
