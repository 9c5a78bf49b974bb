/* winograd_f32_cpu.c for x86-64 CPUs with AVX2 and FMA but no AVX-512 (AMD Zen 2 and 3, Intel client
 * cores): the same F(2x2, 3x3) convolution over channels-last fp32 tensors, the same packed kernel
 * (Co/32, 16, C, 32), the same tasks and the same sums in the same order per output, on 8-lane vectors.
 *
 * The products run in blocks of 4 tiles x 16 output channels (8 accumulators: AVX2 has 16 vector
 * registers where AVX-512 has 32), four blocks per WR tiles x 32 channels of the AVX-512 kernel; each
 * output's sum over input channels is the same chain of FMAs as there, so both kernels give the same
 * numbers (tests/kernels/test_winograd_f32_cpu.py runs each against fp64, and against each other where
 * the host has both).
 */
#include "winograd_math.h"
#include <immintrin.h>
#include <stdint.h>
#include <omp.h>
#include <string.h>

#define WR 8  /* tiles per block of the products (BLOCK in winograd_cpu.py) */

typedef __m256 v8;

/* Lanes 0.. left-1 of a maskload / maskstore (all 8 from left >= 8). */
static inline __m256i lanes(int64_t left) {
    static const int32_t ones[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    return _mm256_loadu_si256((const __m256i *)(ones + 8 - (left >= 8 ? 8 : left)));
}

/* t[4a + b] = (B^T d B)[a][b] of one 4x4 window d (winograd_input's sums). */
static inline void input8(v8 d[4][4], v8 t[16]) {
    v8 e[4][4];
    for (int b = 0; b < 4; b++) {
        e[0][b] = _mm256_sub_ps(d[0][b], d[2][b]);
        e[1][b] = _mm256_add_ps(d[1][b], d[2][b]);
        e[2][b] = _mm256_sub_ps(d[2][b], d[1][b]);
        e[3][b] = _mm256_sub_ps(d[1][b], d[3][b]);
    }
    for (int a = 0; a < 4; a++) {
        t[4 * a] = _mm256_sub_ps(e[a][0], e[a][2]);
        t[4 * a + 1] = _mm256_add_ps(e[a][1], e[a][2]);
        t[4 * a + 2] = _mm256_sub_ps(e[a][2], e[a][1]);
        t[4 * a + 3] = _mm256_sub_ps(e[a][1], e[a][3]);
    }
}

/* y[2i + j] = (A^T m A)[i][j] + bias (winograd_output's sums). */
static inline void output8(const v8 m[16], v8 bias, v8 y[4]) {
    v8 s[2][4];
    for (int j = 0; j < 4; j++) {
        s[0][j] = _mm256_add_ps(_mm256_add_ps(m[j], m[4 + j]), m[8 + j]);
        s[1][j] = _mm256_sub_ps(_mm256_sub_ps(m[4 + j], m[8 + j]), m[12 + j]);
    }
    for (int i = 0; i < 2; i++) {
        y[2 * i] = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(s[i][0], s[i][1]), s[i][2]), bias);
        y[2 * i + 1] = _mm256_add_ps(_mm256_sub_ps(_mm256_sub_ps(s[i][1], s[i][2]), s[i][3]), bias);
    }
}

/* Transforms tiles first.. first+count-1 into v (16, count rounded up to WR, C), the padding rows zero. */
static void transform_tiles(const float *x, float *v, int64_t first, int64_t count, int h, int w, int c) {
    const int64_t padded = (count + WR - 1) / WR * WR, plane = padded * c;
    for (int k = 0; k < 16; k++) memset(v + k * plane + count * c, 0, sizeof(float) * (padded - count) * c);
    for (int64_t i = 0; i < count; i++) {
        int64_t row_at[4];
        int col[4];
        tile_rows_cols(first + i, h, w, c, row_at, col);
        float *out = v + i * c;
        for (int ch = 0; ch < c; ch += 8) {
            const __m256i m = lanes(c - ch);
            v8 d[4][4], t[16];
            for (int a = 0; a < 4; a++)
                for (int b = 0; b < 4; b++)
                    d[a][b] = row_at[a] >= 0 && col[b] >= 0 ? _mm256_maskload_ps(x + row_at[a] + (int64_t)col[b] * c + ch, m)
                                                             : _mm256_setzero_ps();
            input8(d, t);
            for (int k = 0; k < 16; k++) _mm256_maskstore_ps(out + (int64_t)k * plane + ch, m, t[k]);
        }
    }
}

/* The products at the 16 positions of WR tiles (rows row0.. of v) by output channels 32 cb.. 32 cb + 31:
 * per position, four blocks of 4 tiles x 16 channels. */
static void multiply_block(const float *v, int64_t vplane, int64_t row0, const float *up, int cb, int c,
                           float acc_block[16][WR][32]) {
    for (int k = 0; k < 16; k++) {
        const float *vk = v + k * vplane + row0 * c;
        const float *uk = up + ((int64_t)cb * 16 + k) * c * 32;
        for (int r0 = 0; r0 < WR; r0 += 4)
            for (int half = 0; half < 32; half += 16) {
                v8 acc[4][2];
                for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
                const float *vr = vk + (int64_t)r0 * c;
                for (int p = 0; p < c; p++) {
                    const v8 b0 = _mm256_loadu_ps(uk + (int64_t)p * 32 + half);
                    const v8 b1 = _mm256_loadu_ps(uk + (int64_t)p * 32 + half + 8);
#pragma GCC unroll 4
                    for (int r = 0; r < 4; r++) {
                        const v8 a = _mm256_broadcast_ss(vr + (int64_t)r * c + p);
                        acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
                        acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
                    }
                }
                for (int r = 0; r < 4; r++) {
                    _mm256_store_ps(&acc_block[k][r0 + r][half], acc[r][0]);
                    _mm256_store_ps(&acc_block[k][r0 + r][half + 8], acc[r][1]);
                }
            }
    }
}

/* A^T m A of the products of tiles t0.. (those before ``end``) into y: 32 output channels from ch0, bias added,
 * then ``res`` (NULL, or a tensor laid out as y) added. */
static void output_tiles(float acc[16][WR][32], const float *bias, const float *res, float *y, int64_t t0,
                         int64_t end, int th, int tw, int h, int w, int co, int ch0) {
    for (int r = 0; r < WR && t0 + r < end; r++) {
        int n, r0, c0;
        tile_window(t0 + r, th, tw, &n, &r0, &c0);
        r0++, c0++;
        const int rows = r0 + 1 < h ? 2 : 1, cols = c0 + 1 < w ? 2 : 1;
        const int64_t at = (((int64_t)n * h + r0) * w + c0) * co + ch0;
        for (int ch = 0; ch < 32; ch += 8) {
            const v8 b = bias ? _mm256_loadu_ps(bias + ch0 + ch) : _mm256_setzero_ps();
            v8 m[16], out[4];
            for (int k = 0; k < 16; k++) m[k] = _mm256_load_ps(&acc[k][r][ch]);
            output8(m, b, out);
            for (int i = 0; i < rows; i++)
                for (int j = 0; j < cols; j++) {
                    const int64_t o = at + ((int64_t)i * w + j) * co + ch;
                    _mm256_storeu_ps(y + o, res ? _mm256_add_ps(out[2 * i + j], _mm256_loadu_ps(res + o)) : out[2 * i + j]);
                }
        }
    }
}

#define WF_ALIGN 32
#include "winograd_f32_drive.h"
