/* An unfused LoRA adapter's term added into its layer's output in one pass over the rows, bf16, for
 * x86-64 CPUs with AVX512-BF16 (runtime/kernels/lora_cpu.py packs the weights; runtime/lora/entry.py
 * calls it).
 *
 * out[i] += scale * U (D x[i]) for each row i of x: the down product to r values summed in fp32
 * (vdpbf16ps along k), scaled and rounded to bf16 (as the two-matmul path rounds its (rows, r)
 * product), then the up product summed in fp32 onto out's row (vdpbf16ps along r) and rounded once.
 * The (rows, r) product never leaves the registers and the stack, and each row of x and of out is
 * read once: the two-matmul path reads x, writes and reads the product, then reads and writes out,
 * with a skinny GEMM each time (r columns, then r inner products).
 */
#include "cpu_math.h"
#include "lora_drive.h"
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define RB LORA_RB

static inline __mmask32 tail32(int left) {
    return left >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << left) - 1u);
}

/* h[q] for q < r (bf16, pairs packed as uint32) of one or two rows x0, x1 (x1 may equal x0). */
static void down_rows(const uint16_t *x0, const uint16_t *x1, const uint16_t *down, int k, int r, float scale,
                      uint16_t *h0, uint16_t *h1) {
    const __m256 s = _mm256_set1_ps(scale);
    for (int j0 = 0; j0 < r; j0 += 8) {
        __m512 a0[8], a1[8];
        for (int q = 0; q < 8; q++) a0[q] = a1[q] = _mm512_setzero_ps();
        for (int c = 0; c < k; c += 32) {
            const __mmask32 mk = tail32(k - c);
            const __m512bh v0 = (__m512bh)_mm512_maskz_loadu_epi16(mk, x0 + c);
            const __m512bh v1 = (__m512bh)_mm512_maskz_loadu_epi16(mk, x1 + c);
#pragma GCC unroll 8
            for (int q = 0; q < 8; q++) {
                const __m512bh w = (__m512bh)_mm512_maskz_loadu_epi16(mk, down + (int64_t)(j0 + q) * k + c);
                a0[q] = _mm512_dpbf16_ps(a0[q], v0, w);
                a1[q] = _mm512_dpbf16_ps(a1[q], v1, w);
            }
        }
        _mm_storeu_si128((__m128i *)(h0 + j0), (__m128i)_mm256_cvtneps_pbh(_mm256_mul_ps(lora_sum8(a0), s)));
        _mm_storeu_si128((__m128i *)(h1 + j0), (__m128i)_mm256_cvtneps_pbh(_mm256_mul_ps(lora_sum8(a1), s)));
    }
}

/* ``rows`` (1..RB) rows starting at x0 / out0; a block of fewer rows computes its last row in the spare
 * places and stores only its own. The up product runs over the rank 8 at a time (four pairs, their
 * broadcasts held in registers); past the first 8, the sums wait in ``scratch`` (RB rows of n fp32). */
static void block(const void *x_at, int64_t ldx, const void *down_at, const void *up_at, void *out_at, int64_t ldo,
                  int rows, int k, int r, int n, float scale, float *scratch) {
    const uint16_t *x0 = x_at, *down = down_at;
    const uint32_t *up = up_at;
    uint16_t *out0 = out_at;
    uint16_t h[RB][LORA_MAX_R];
    const uint16_t *xr[RB];
    uint16_t *orow[RB];
    lora_rows(x0, ldx, out0, ldo, rows, sizeof(uint16_t), (const void **)xr, (void **)orow);
    for (int i = 0; i < RB; i += 2) down_rows(xr[i], xr[i + 1], down, k, r, scale, h[i], h[i + 1]);
    for (int g = 0; g < r; g += 8) {
        const int first = g == 0, last = g + 8 >= r;
        __m512bh hb[RB][4];
        for (int i = 0; i < RB; i++)
            for (int p = 0; p < 4; p++) {
                uint32_t pair;
                memcpy(&pair, h[i] + g + 2 * p, 4);
                hb[i][p] = (__m512bh)_mm512_set1_epi32((int)pair);
            }
        const uint32_t *w0 = up + (int64_t)(g / 2) * n;
        for (int c = 0; c < n; c += 16) {
            const __mmask16 mn = tail_mask(n - c);
            __m512 acc[RB];
#pragma GCC unroll 4
            for (int i = 0; i < RB; i++)
                acc[i] = first ? load_bf16(orow[i] + c, mn) : _mm512_maskz_loadu_ps(mn, scratch + (int64_t)i * n + c);
#pragma GCC unroll 4
            for (int p = 0; p < 4; p++) {
                const __m512bh w = (__m512bh)_mm512_maskz_loadu_epi32(mn, w0 + (int64_t)p * n + c);
#pragma GCC unroll 4
                for (int i = 0; i < RB; i++) acc[i] = _mm512_dpbf16_ps(acc[i], hb[i][p], w);
            }
            if (last) {
                for (int i = 0; i < rows; i++) _mm256_mask_storeu_epi16(orow[i] + c, mn, (__m256i)_mm512_cvtneps_pbh(acc[i]));
            } else {
#pragma GCC unroll 4
                for (int i = 0; i < RB; i++) _mm512_mask_storeu_ps(scratch + (int64_t)i * n + c, mn, acc[i]);
            }
        }
    }
}

/* x (m, k) with row stride ldx; down (r, k) row-major; up_pairs (r / 2, n, 2): the up weight U (n, r) as
 * pairs of its columns, [p][c] = (U[c, 2p], U[c, 2p + 1]); out (m, n) with row stride ldo, added into.
 * r a multiple of 8 (zero-padded by the caller), at most LORA_MAX_R. Work split: lora_drive.h. Returns 0, or
 * -1 (out untouched) when the scratch rows for a rank over 8 could not be allocated. */
int dr_lora_term_bf16(const uint16_t *x, int64_t ldx, const uint16_t *down, const uint16_t *up_pairs, uint16_t *out,
                      int64_t ldo, int64_t m, int k, int r, int n, float scale, int threads) {
    return lora_drive((const char *)x, ldx, down, up_pairs, (char *)out, ldo, m, k, r, n, scale, threads,
                      sizeof(uint16_t), block);
}
