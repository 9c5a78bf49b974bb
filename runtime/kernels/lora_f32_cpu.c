/* An unfused LoRA adapter's term added into its layer's output in one pass over the rows, fp32, for x86-64
 * CPUs with AVX-512 (the fp32 sibling of lora_cpu.c; runtime/kernels/lora_cpu.py packs the weights).
 *
 * out[i] += scale * U (D x[i]) for each row i of x: the down product to r values summed in fp32 (FMAs along
 * k, in 16 lanes, then across them), kept in fp32, then the up product summed onto out's row. The (rows, r)
 * product never leaves the registers and the stack, and each row of x and of out is read once.
 */
#include "cpu_math.h"
#include "lora_drive.h"
#include <immintrin.h>
#include <stdint.h>

#define RB LORA_RB

/* h[q] = scale * D[q] . x for q < r, of two rows x0, x1 (x1 may equal x0). */
static void down_rows(const float *x0, const float *x1, const float *down, int k, int r, float scale, float *h0,
                      float *h1) {
    const __m256 s = _mm256_set1_ps(scale);
    for (int j0 = 0; j0 < r; j0 += 8) {
        __m512 a0[8], a1[8];
        for (int q = 0; q < 8; q++) a0[q] = a1[q] = _mm512_setzero_ps();
        for (int c = 0; c < k; c += 16) {
            const __mmask16 mk = tail_mask(k - c);
            const __m512 v0 = _mm512_maskz_loadu_ps(mk, x0 + c), v1 = _mm512_maskz_loadu_ps(mk, x1 + c);
#pragma GCC unroll 8
            for (int q = 0; q < 8; q++) {
                const __m512 w = _mm512_maskz_loadu_ps(mk, down + (int64_t)(j0 + q) * k + c);
                a0[q] = _mm512_fmadd_ps(v0, w, a0[q]);
                a1[q] = _mm512_fmadd_ps(v1, w, a1[q]);
            }
        }
        _mm256_storeu_ps(h0 + j0, _mm256_mul_ps(lora_sum8(a0), s));
        _mm256_storeu_ps(h1 + j0, _mm256_mul_ps(lora_sum8(a1), s));
    }
}

/* ``rows`` (1..RB) rows starting at x0 / out0; a block of fewer rows computes its last row in the spare
 * places and stores only its own. The up product runs over the rank 8 at a time, its broadcasts held in
 * registers; past the first 8, the sums wait in ``scratch`` (RB rows of n). */
static void block(const void *x_at, int64_t ldx, const void *down_at, const void *up_at, void *out_at, int64_t ldo,
                  int rows, int k, int r, int n, float scale, float *scratch) {
    const float *x0 = x_at, *down = down_at, *up_t = up_at;
    float *out0 = out_at;
    float h[RB][LORA_MAX_R];
    const float *xr[RB];
    float *orow[RB];
    lora_rows(x0, ldx, out0, ldo, rows, sizeof(float), (const void **)xr, (void **)orow);
    for (int i = 0; i < RB; i += 2) down_rows(xr[i], xr[i + 1], down, k, r, scale, h[i], h[i + 1]);
    for (int g = 0; g < r; g += 8) {
        const int first = g == 0, last = g + 8 >= r;
        __m512 hb[RB][8];
        for (int i = 0; i < RB; i++)
            for (int q = 0; q < 8; q++) hb[i][q] = _mm512_set1_ps(h[i][g + q]);
        const float *w0 = up_t + (int64_t)g * n;
        for (int c = 0; c < n; c += 16) {
            const __mmask16 mn = tail_mask(n - c);
            __m512 acc[RB];
#pragma GCC unroll 4
            for (int i = 0; i < RB; i++)
                acc[i] = _mm512_maskz_loadu_ps(mn, first ? orow[i] + c : scratch + (int64_t)i * n + c);
#pragma GCC unroll 8
            for (int q = 0; q < 8; q++) {
                const __m512 w = _mm512_maskz_loadu_ps(mn, w0 + (int64_t)q * n + c);
#pragma GCC unroll 4
                for (int i = 0; i < RB; i++) acc[i] = _mm512_fmadd_ps(hb[i][q], w, acc[i]);
            }
            if (last) {
                for (int i = 0; i < rows; i++) _mm512_mask_storeu_ps(orow[i] + c, mn, acc[i]);
            } else {
#pragma GCC unroll 4
                for (int i = 0; i < RB; i++) _mm512_mask_storeu_ps(scratch + (int64_t)i * n + c, mn, acc[i]);
            }
        }
    }
}

/* x (m, k) with row stride ldx; down (r, k) row-major; up_t (r, n): the up weight U (n, r) transposed; out
 * (m, n) with row stride ldo, added into. r a multiple of 8 (zero-padded by the caller), at most LORA_MAX_R.
 * Work split: lora_drive.h. Returns 0, or -1 (out untouched) when the scratch rows for a rank over 8 could
 * not be allocated. */
int dr_lora_term_f32(const float *x, int64_t ldx, const float *down, const float *up_t, float *out, int64_t ldo,
                     int64_t m, int k, int r, int n, float scale, int threads) {
    return lora_drive((const char *)x, ldx, down, up_t, (char *)out, ldo, m, k, r, n, scale, threads, sizeof(float),
                      block);
}
