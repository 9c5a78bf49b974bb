/* The fp32 sibling of winograd_cpu.c: a 3x3, stride-1, padding-1 convolution as Winograd F(2x2, 3x3) over
 * channels-last fp32 tensors, for x86-64 CPUs with AVX-512 (runtime/kernels/winograd_cpu.py packs the kernel).
 *
 * Same transforms and task layout as the bf16 kernel (see there): per task up to ``group`` tiles are
 * transformed into the thread's scratch, multiplied by the transformed kernel in blocks of WR tiles x 32
 * output channels at all 16 positions, and transformed back into the output with the bias. Everything
 * stays fp32: the products are FMAs (one input value broadcast against 32 output channels), and the
 * result's error against fp64 is below the direct fp32 convolution's (bench/RESULTS.md, session 15).
 */
#include "cpu_math.h"
#include "winograd_math.h"
#include <immintrin.h>
#include <stdint.h>
#include <omp.h>
#include <string.h>

#define WR 8  /* tiles per block of the products (BLOCK in winograd_cpu.py) */

/* Transforms tiles first.. first+count-1 into v (16, count rounded up to WR, C), the padding rows zero. */
static void transform_tiles(const float *x, float *v, int64_t first, int64_t count, int h, int w, int c) {
    const int64_t padded = (count + WR - 1) / WR * WR, plane = padded * c;
    for (int k = 0; k < 16; k++) memset(v + k * plane + count * c, 0, sizeof(float) * (padded - count) * c);
    for (int64_t i = 0; i < count; i++) {
        int64_t row_at[4];
        int col[4];
        tile_rows_cols(first + i, h, w, c, row_at, col);
        float *out = v + i * c;
        for (int ch = 0; ch < c; ch += 16) {
            const __mmask16 m = tail_mask(c - ch);
            __m512 d[4][4], t[16];
            for (int a = 0; a < 4; a++)
                for (int b = 0; b < 4; b++)
                    d[a][b] = row_at[a] >= 0 && col[b] >= 0 ? _mm512_maskz_loadu_ps(m, x + row_at[a] + (int64_t)col[b] * c + ch)
                                                             : _mm512_setzero_ps();
            winograd_input(d, t);
            for (int k = 0; k < 16; k++) _mm512_mask_storeu_ps(out + (int64_t)k * plane + ch, m, t[k]);
        }
    }
}

/* The products at the 16 positions of WR tiles (rows row0.. of v) by output channels 32 cb.. 32 cb + 31. */
static void multiply_block(const float *v, int64_t vplane, int64_t row0, const float *up, int cb, int c,
                           float acc_block[16][WR][32]) {
    for (int k = 0; k < 16; k++) {
        const float *vk = v + k * vplane + row0 * c;
        const float *uk = up + ((int64_t)cb * 16 + k) * c * 32;
        __m512 acc[WR][2];
#pragma GCC unroll 8
        for (int r = 0; r < WR; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        for (int p = 0; p < c; p++) {
            const __m512 b0 = _mm512_loadu_ps(uk + (int64_t)p * 32), b1 = _mm512_loadu_ps(uk + (int64_t)p * 32 + 16);
#pragma GCC unroll 8
            for (int r = 0; r < WR; r++) {
                const __m512 a = _mm512_set1_ps(vk[(int64_t)r * c + p]);
                acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < WR; r++) {
            _mm512_store_ps(&acc_block[k][r][0], acc[r][0]);
            _mm512_store_ps(&acc_block[k][r][16], acc[r][1]);
        }
    }
}

/* A^T m A of the products of tiles t0.. (those before ``end``) into y: 32 output channels from ch0, bias added,
 * then ``res`` (NULL, or a tensor laid out as y) added: the sum eager computes after the convolution. */
static void output_tiles(float acc[16][WR][32], const float *bias, const float *res, float *y, int64_t t0,
                         int64_t end, int th, int tw, int h, int w, int co, int ch0) {
    for (int r = 0; r < WR && t0 + r < end; r++) {
        int n, r0, c0;
        tile_window(t0 + r, th, tw, &n, &r0, &c0);
        r0++, c0++;  /* the tile's first output row and column */
        const int rows = r0 + 1 < h ? 2 : 1, cols = c0 + 1 < w ? 2 : 1;
        const int64_t at = (((int64_t)n * h + r0) * w + c0) * co + ch0;
        for (int half = 0; half < 2; half++) {
            const int ch = 16 * half;
            const __m512 b = bias ? _mm512_loadu_ps(bias + ch0 + ch) : _mm512_setzero_ps();
            __m512 m[16], out[4];
            for (int k = 0; k < 16; k++) m[k] = _mm512_load_ps(&acc[k][r][ch]);
            winograd_output(m, b, out);
            for (int i = 0; i < rows; i++)
                for (int j = 0; j < cols; j++) {
                    const int64_t o = at + ((int64_t)i * w + j) * co + ch;
                    _mm512_storeu_ps(y + o, res ? _mm512_add_ps(out[2 * i + j], _mm512_loadu_ps(res + o)) : out[2 * i + j]);
                }
        }
    }
}

#define WF_ALIGN 64
#include "winograd_f32_drive.h"
