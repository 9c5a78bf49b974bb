/* Winograd F(2x2, 3x3) transforms for a 3x3, stride-1, padding-1 convolution over channels-last bf16
 * tensors, for x86-64 CPUs with AVX512-BF16 (kernels/winograd_cpu.py does the weight transform and
 * runs the 16 products between these two kernels as one batched matmul).
 *
 * Each 2x2 output tile reads the 4x4 input window around it. With B^T = [1 0 -1 0; 0 1 1 0;
 * 0 -1 1 0; 0 1 0 -1] and A^T = [1 1 1 0; 0 1 -1 -1] (Lavin & Gray 2015), the tile is
 * A^T [ U (.) (B^T d B) ] A where U = G g G^T is the transformed 3x3 kernel: 16 products per input
 * and output channel pair for 4 outputs instead of 36.
 *
 * dr_winograd_input_bf16: x (N, H, W, C) -> v (16, T_pad, C), T = N * ceil(H/2) * ceil(W/2) tiles in
 *   (n, row, column) order, T_pad = T rounded up to WR (those rows zero), v[k] the k-th (row-major)
 *   element of B^T d B; zero outside the image.
 * dr_winograd_output_bf16: m (16, T, Co) -> y (N, H, W, Co) = A^T m A + bias, the rows and columns
 *   past H and W (odd sizes) dropped. Transforms in fp32, one rounding to bf16 on the way out.
 */
#include "cpu_math.h"
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

static inline __m512bh broadcast_pair(const uint16_t *at) {
    uint32_t pair;
    memcpy(&pair, at, 4);
    return (__m512bh)_mm512_set1_epi32((int)pair);
}

#define WR 8  /* tiles per task of the products; v has its tile count rounded up to it */

static inline void store_bf16(uint16_t *at, __m512 v, __mmask16 m) {
    _mm256_mask_storeu_epi16(at, m, (__m256i)_mm512_cvtneps_pbh(v));
}

static void input_phase(const uint16_t *x, uint16_t *v, int64_t first, int64_t count, int h, int w, int c,
                        int threads) {
    const int th = (h + 1) / 2, tw = (w + 1) / 2;
    const int64_t padded = (count + WR - 1) / WR * WR, plane = padded * c;
    for (int k = 0; k < 16; k++) memset(v + k * plane + count * c, 0, sizeof(uint16_t) * (padded - count) * c);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < count; i++) {
        const int64_t t = first + i;
        const int n = (int)(t / ((int64_t)th * tw)), rest = (int)(t % ((int64_t)th * tw));
        const int r0 = 2 * (rest / tw) - 1, c0 = 2 * (rest % tw) - 1;
        const uint16_t *rows[4];
        for (int i = 0; i < 4; i++) {
            const int r = r0 + i;
            rows[i] = (r >= 0 && r < h) ? x + (((int64_t)n * h + r) * w) * c : 0;
        }
        int col[4];
        for (int j = 0; j < 4; j++) col[j] = (c0 + j >= 0 && c0 + j < w) ? c0 + j : -1;
        uint16_t *out = v + i * c;
        for (int ch = 0; ch < c; ch += 16) {
            const __mmask16 m = tail_mask(c - ch);
            __m512 d[4][4];
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 4; j++)
                    d[i][j] = (rows[i] && col[j] >= 0) ? load_bf16(rows[i] + (int64_t)col[j] * c + ch, m)
                                                       : _mm512_setzero_ps();
            __m512 e[4][4];  /* B^T d: combine rows */
            for (int j = 0; j < 4; j++) {
                e[0][j] = _mm512_sub_ps(d[0][j], d[2][j]);
                e[1][j] = _mm512_add_ps(d[1][j], d[2][j]);
                e[2][j] = _mm512_sub_ps(d[2][j], d[1][j]);
                e[3][j] = _mm512_sub_ps(d[1][j], d[3][j]);
            }
            for (int i = 0; i < 4; i++) {  /* (B^T d) B: combine columns */
                uint16_t *o = out + (int64_t)(4 * i) * plane + ch;
                store_bf16(o, _mm512_sub_ps(e[i][0], e[i][2]), m);
                store_bf16(o + plane, _mm512_add_ps(e[i][1], e[i][2]), m);
                store_bf16(o + 2 * plane, _mm512_sub_ps(e[i][2], e[i][1]), m);
                store_bf16(o + 3 * plane, _mm512_sub_ps(e[i][1], e[i][3]), m);
            }
        }
    }
}


/* Stores the output transform of the fp32 products acc[k][r][0..31] (position k, tile r of the
 * task) for tiles t0.. of this task: 32 output channels from ch0, bias added, rounded to bf16. */
static void output_tiles(float acc[16][WR][32], const uint16_t *bias, uint16_t *y, int64_t t0, int64_t tiles,
                         int th, int tw, int h, int w, int co, int ch0) {
    for (int r = 0; r < WR && t0 + r < tiles; r++) {
        const int64_t t = t0 + r;
        const int n = (int)(t / ((int64_t)th * tw)), rest = (int)(t % ((int64_t)th * tw));
        const int r0 = 2 * (rest / tw), c0 = 2 * (rest % tw);
        const int rows = r0 + 1 < h ? 2 : 1, cols = c0 + 1 < w ? 2 : 1;
        uint16_t *base = y + (((int64_t)n * h + r0) * w + c0) * co + ch0;
        for (int half = 0; half < 2; half++) {
            const int ch = 16 * half;
            const __m512 b = bias ? load_bf16(bias + ch0 + ch, 0xFFFF) : _mm512_setzero_ps();
            __m512 s[2][4];  /* A^T m: combine rows */
            for (int j = 0; j < 4; j++) {
                const __m512 m0 = _mm512_load_ps(&acc[j][r][ch]), m1 = _mm512_load_ps(&acc[4 + j][r][ch]);
                const __m512 m2 = _mm512_load_ps(&acc[8 + j][r][ch]), m3 = _mm512_load_ps(&acc[12 + j][r][ch]);
                s[0][j] = _mm512_add_ps(_mm512_add_ps(m0, m1), m2);
                s[1][j] = _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3);
            }
            for (int i = 0; i < rows; i++) {  /* (A^T m) A: combine columns */
                uint16_t *o = base + (int64_t)i * w * co + ch;
                store_bf16(o, _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(s[i][0], s[i][1]), s[i][2]), b), 0xFFFF);
                if (cols == 2)
                    store_bf16(o + co, _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(s[i][1], s[i][2]), s[i][3]), b),
                               0xFFFF);
            }
        }
    }
}

/* The 16 products and the output transform, fused: v (16, T_pad, C) from dr_winograd_input_bf16
 * (T_pad = T rounded up to WR, the rows past T zero), up the transformed kernel packed by blocks of
 * 32 output channels and in pairs of input channels (Co/32, 16, C/2, 32, 2), y (N, H, W, Co). Each task multiplies WR tiles by 32 output
 * channels for all 16 positions on vdpbf16ps (fp32 sums, kept in a 16 KiB block, never rounded) and
 * transforms them into the tiles' outputs. C even, Co a multiple of 32. */
static void products_phase(const uint16_t *v, const uint16_t *up, const uint16_t *bias, uint16_t *y, int64_t first,
                           int64_t count, int h, int w, int c, int co, int threads) {
    const int th = (h + 1) / 2, tw = (w + 1) / 2;
    const int64_t blocks = (count + WR - 1) / WR, vplane = blocks * WR * c;
    const int col_blocks = co / 32, pairs = c / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t task = 0; task < blocks * col_blocks; task++) {
        const int cb = (int)(task / blocks);
        const int64_t rb = task % blocks;
        float acc_block[16][WR][32] __attribute__((aligned(64)));
        for (int k = 0; k < 16; k++) {
            const uint16_t *vk = v + k * vplane + rb * WR * c;
            const uint16_t *uk = up + ((int64_t)cb * 16 + k) * pairs * 64;
            __m512 acc[WR][2];
#pragma GCC unroll 8
            for (int r = 0; r < WR; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
            for (int p = 0; p < pairs; p++) {
                const __m512bh b0 = (__m512bh)_mm512_loadu_si512(uk + (int64_t)p * 64);
                const __m512bh b1 = (__m512bh)_mm512_loadu_si512(uk + (int64_t)p * 64 + 32);
#pragma GCC unroll 8
                for (int r = 0; r < WR; r++) {
                    const __m512bh a = broadcast_pair(vk + (int64_t)r * c + 2 * p);
                    acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
                    acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
                }
            }
#pragma GCC unroll 8
            for (int r = 0; r < WR; r++) {
                _mm512_store_ps(&acc_block[k][r][0], acc[r][0]);
                _mm512_store_ps(&acc_block[k][r][16], acc[r][1]);
            }
        }
        output_tiles(acc_block, bias, y, first + rb * WR, first + count, th, tw, h, w, co, 32 * cb);
    }
}

/* y = conv2d(x, g, bias, padding=1) for channels-last bf16 x (N, H, W, C) and y (N, H, W, Co), with
 * up the packed transformed kernel; the tiles in chunks of ``chunk`` (a multiple of WR), each chunk
 * transformed into ``scratch`` (16 * chunk * C values) and multiplied while it is in cache. */
void dr_winograd_conv3x3_bf16(const uint16_t *x, const uint16_t *up, const uint16_t *bias, uint16_t *y,
                              uint16_t *scratch, int n_batch, int h, int w, int c, int co, int64_t chunk,
                              int threads) {
    const int64_t tiles = (int64_t)n_batch * ((h + 1) / 2) * ((w + 1) / 2);
    for (int64_t first = 0; first < tiles; first += chunk) {
        const int64_t count = tiles - first < chunk ? tiles - first : chunk;
        input_phase(x, scratch, first, count, h, w, c, threads);
        products_phase(scratch, up, bias, y, first, count, h, w, c, co, threads);
    }
}
