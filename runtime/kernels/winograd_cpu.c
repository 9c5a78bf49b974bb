/* A 3x3, stride-1, padding-1 convolution as Winograd F(2x2, 3x3) over channels-last bf16 tensors, for
 * x86-64 CPUs with AVX512-BF16 (runtime/kernels/winograd_cpu.py transforms and packs the kernel).
 *
 * Each 2x2 output tile reads the 4x4 input window d around it. With B^T = [1 0 -1 0; 0 1 1 0;
 * 0 -1 1 0; 0 1 0 -1] and A^T = [1 1 1 0; 0 1 -1 -1] (Lavin & Gray 2015), the tile is
 * A^T [ U (.) (B^T d B) ] A where U = G g G^T is the transformed kernel: 16 products per input and
 * output channel pair for 4 outputs instead of 36. The products are summed over input channels:
 * 16 independent matmuls (tiles x C) by (C x Co). The input transform is rounded to bf16 (what the
 * matmul units take); the sums stay fp32 through the output transform; one rounding on the way out.
 */
#include "cpu_math.h"
#include "winograd_math.h"
#include <immintrin.h>
#include <stdint.h>
#include <omp.h>
#include <string.h>

static inline __m512bh broadcast_pair(const uint16_t *at) {
    uint32_t pair;
    memcpy(&pair, at, 4);
    return (__m512bh)_mm512_set1_epi32((int)pair);
}

#define WR 8  /* tiles per block of the products */

static inline void store_bf16(uint16_t *at, __m512 v, __mmask16 m) {
    _mm256_mask_storeu_epi16(at, m, (__m256i)_mm512_cvtneps_pbh(v));
}

/* Transforms tiles first.. first+count-1 into v (16, count rounded up to WR, C), the padding rows zero. */
static void transform_tiles(const uint16_t *x, uint16_t *v, int64_t first, int64_t count, int h, int w, int c) {
    const int64_t padded = (count + WR - 1) / WR * WR, plane = padded * c;
    for (int k = 0; k < 16; k++) memset(v + k * plane + count * c, 0, sizeof(uint16_t) * (padded - count) * c);
    for (int64_t i = 0; i < count; i++) {
        int64_t row_at[4];
        int col[4];
        tile_rows_cols(first + i, h, w, c, row_at, col);
        uint16_t *out = v + i * c;
        for (int ch = 0; ch < c; ch += 16) {
            const __mmask16 m = tail_mask(c - ch);
            __m512 d[4][4], t[16];
            for (int a = 0; a < 4; a++)
                for (int b = 0; b < 4; b++)
                    d[a][b] = row_at[a] >= 0 && col[b] >= 0 ? load_bf16(x + row_at[a] + (int64_t)col[b] * c + ch, m)
                                                             : _mm512_setzero_ps();
            winograd_input(d, t);
            for (int k = 0; k < 16; k++) store_bf16(out + (int64_t)k * plane + ch, t[k], m);
        }
    }
}

/* Stores the output transform of the fp32 products acc[k][r][0..31] (position k, tile t0 + r) for
 * the tiles before ``end``: 32 output channels from ch0, bias added, and ``res`` (NULL, or a tensor laid
 * out as y: the residual a ResNet block adds) added before the one rounding to bf16. */
static void output_tiles(float acc[16][WR][32], const uint16_t *bias, const uint16_t *res, uint16_t *y, int64_t t0,
                         int64_t end, int th, int tw, int h, int w, int co, int ch0) {
    for (int r = 0; r < WR && t0 + r < end; r++) {
        int n, r0, c0;
        tile_window(t0 + r, th, tw, &n, &r0, &c0);
        r0++, c0++;  /* the tile's first output row and column */
        const int rows = r0 + 1 < h ? 2 : 1, cols = c0 + 1 < w ? 2 : 1;
        const int64_t at = (((int64_t)n * h + r0) * w + c0) * co + ch0;
        for (int half = 0; half < 2; half++) {
            const int ch = 16 * half;
            const __m512 b = bias ? load_bf16(bias + ch0 + ch, 0xFFFF) : _mm512_setzero_ps();
            __m512 m[16], out[4];
            for (int k = 0; k < 16; k++) m[k] = _mm512_load_ps(&acc[k][r][ch]);
            winograd_output(m, b, out);
            for (int i = 0; i < rows; i++)
                for (int j = 0; j < cols; j++) {
                    const int64_t o = at + ((int64_t)i * w + j) * co + ch;
                    const __m512 add = res ? load_bf16(res + o, 0xFFFF) : _mm512_setzero_ps();
                    store_bf16(y + o, res ? _mm512_add_ps(out[2 * i + j], add) : out[2 * i + j], 0xFFFF);
                }
        }
    }
}

/* The products at the npos transformed positions of WR tiles (rows row0.. of v, whose planes are
 * vplane apart) by the transformed kernel's output channels 32 cb.. 32 cb + 31, on vdpbf16ps: fp32
 * sums, never rounded. */
static void multiply_block(const uint16_t *v, int64_t vplane, int64_t row0, const uint16_t *up, int cb, int c,
                           int npos, float acc_block[16][WR][32]) {
    const int pairs = c / 2;
    for (int k = 0; k < npos; k++) {
        const uint16_t *vk = v + k * vplane + row0 * c;
        const uint16_t *uk = up + ((int64_t)cb * npos + k) * pairs * 64;
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
}

/* Nearest 2x upsampling then the 3x3 convolution, one output tile per input pixel: the 4x4 window
 * of the doubled map around output block (2i, 2j) has input rows i-1, i, i, i+1 (columns alike), so
 * B^T d has rows x[i-1] - x[i], 2 x[i], 0, x[i] - x[i+1]: 9 of the 16 positions are nonzero. v holds
 * those 9 (positions (a, b) for a, b in {0, 1, 3}), in (9, count rounded up to WR, C). */
static void transform_tiles_up2(const uint16_t *x, uint16_t *v, int64_t first, int64_t count, int h, int w, int c) {
    const int64_t padded = (count + WR - 1) / WR * WR, plane = padded * c;
    for (int k = 0; k < 9; k++) memset(v + k * plane + count * c, 0, sizeof(uint16_t) * (padded - count) * c);
    const __m512 two = _mm512_set1_ps(2.0f);
    for (int64_t t = 0; t < count; t++) {
        const int64_t tile = first + t;
        const int n = (int)(tile / ((int64_t)h * w)), rest = (int)(tile % ((int64_t)h * w));
        const int i = rest / w, j = rest % w;
        const uint16_t *rows[3];
        int col[3];
        for (int a = 0; a < 3; a++) {
            rows[a] = (i - 1 + a >= 0 && i - 1 + a < h) ? x + (((int64_t)n * h + i - 1 + a) * w) * c : 0;
            col[a] = (j - 1 + a >= 0 && j - 1 + a < w) ? j - 1 + a : -1;
        }
        uint16_t *out = v + t * c;
        for (int ch = 0; ch < c; ch += 16) {
            const __mmask16 m = tail_mask(c - ch);
            __m512 d[3][3];
            for (int a = 0; a < 3; a++)
                for (int b = 0; b < 3; b++)
                    d[a][b] = (rows[a] && col[b] >= 0) ? load_bf16(rows[a] + (int64_t)col[b] * c + ch, m)
                                                       : _mm512_setzero_ps();
            __m512 e[3][3];  /* rows: x[i-1] - x[i], 2 x[i], x[i] - x[i+1] */
            for (int b = 0; b < 3; b++) {
                e[0][b] = _mm512_sub_ps(d[0][b], d[1][b]);
                e[1][b] = _mm512_mul_ps(d[1][b], two);
                e[2][b] = _mm512_sub_ps(d[1][b], d[2][b]);
            }
            for (int a = 0; a < 3; a++) {  /* columns alike */
                uint16_t *o = out + (int64_t)(3 * a) * plane + ch;
                store_bf16(o, _mm512_sub_ps(e[a][0], e[a][1]), m);
                store_bf16(o + plane, _mm512_mul_ps(e[a][1], two), m);
                store_bf16(o + 2 * plane, _mm512_sub_ps(e[a][1], e[a][2]), m);
            }
        }
    }
}

/* The output transform of the 9 nonzero positions (acc[3 a' + b'], a', b' standing for rows and
 * columns 0, 1, 3) into the 2x2 block at (2i, 2j) of the doubled map, bias added. */
static void output_tiles_up2(float acc[16][WR][32], const uint16_t *bias, uint16_t *y, int64_t t0, int64_t end,
                             int h, int w, int co, int ch0) {
    for (int r = 0; r < WR && t0 + r < end; r++) {
        const int64_t t = t0 + r;
        const int n = (int)(t / ((int64_t)h * w)), rest = (int)(t % ((int64_t)h * w));
        uint16_t *base = y + (((int64_t)n * 2 * h + 2 * (rest / w)) * 2 * w + 2 * (rest % w)) * co + ch0;
        for (int half = 0; half < 2; half++) {
            const int ch = 16 * half;
            const __m512 b = bias ? load_bf16(bias + ch0 + ch, 0xFFFF) : _mm512_setzero_ps();
            __m512 s[2][3];  /* A^T m with row 2 zero: m0 + m1, m1 - m3 */
            for (int j = 0; j < 3; j++) {
                const __m512 m0 = _mm512_load_ps(&acc[j][r][ch]), m1 = _mm512_load_ps(&acc[3 + j][r][ch]);
                const __m512 m3 = _mm512_load_ps(&acc[6 + j][r][ch]);
                s[0][j] = _mm512_add_ps(m0, m1);
                s[1][j] = _mm512_sub_ps(m1, m3);
            }
            for (int i = 0; i < 2; i++) {
                uint16_t *o = base + (int64_t)i * 2 * w * co + ch;
                store_bf16(o, _mm512_add_ps(_mm512_add_ps(s[i][0], s[i][1]), b), 0xFFFF);
                store_bf16(o + co, _mm512_add_ps(_mm512_sub_ps(s[i][1], s[i][2]), b), 0xFFFF);
            }
        }
    }
}

/* Both convolutions: ``up2`` 0 for conv2d(x, g, padding=1), y (N, H, W, Co); 1 for the convolution of
 * x doubled by nearest upsampling, y (N, 2H, 2W, Co). up = G g G^T at the 16 (9 for up2) positions,
 * packed by blocks of 32 output channels and in pairs of input channels (Co/32, 16 or 9, C/2, 32, 2);
 * C even, Co a multiple of 32. Each task takes ``group`` tiles (a multiple of WR) and a share
 * 1/col_parts of the output channels: it transforms its tiles into its thread's part of ``scratch``
 * (16 * group * C values per thread), then multiplies them by its channels' kernel and transforms
 * the products into outputs. A task's transformed tiles never leave its core. */
static void winograd(const uint16_t *x, const uint16_t *up, const uint16_t *bias, const uint16_t *res, uint16_t *y,
                     uint16_t *scratch, int n_batch, int h, int w, int c, int co, int64_t group, int col_parts,
                     int threads, int up2) {
    const int th = up2 ? h : (h + 1) / 2, tw = up2 ? w : (w + 1) / 2, npos = up2 ? 9 : 16;
    const int64_t tiles = (int64_t)n_batch * th * tw, groups = (tiles + group - 1) / group;
    const int col_blocks = co / 32, per_part = (col_blocks + col_parts - 1) / col_parts;
#pragma omp parallel num_threads(threads)
    {
        uint16_t *v = scratch + (int64_t)omp_get_thread_num() * 16 * group * c;
        float acc_block[16][WR][32] __attribute__((aligned(64)));
#pragma omp for schedule(static)
        for (int64_t task = 0; task < groups * col_parts; task++) {
            const int64_t first = task / col_parts * group;
            const int64_t count = tiles - first < group ? tiles - first : group;
            const int64_t vplane = (count + WR - 1) / WR * WR * c;
            const int part = (int)(task % col_parts);
            if (up2)
                transform_tiles_up2(x, v, first, count, h, w, c);
            else
                transform_tiles(x, v, first, count, h, w, c);
            const int cb_end = (part + 1) * per_part < col_blocks ? (part + 1) * per_part : col_blocks;
            for (int cb = part * per_part; cb < cb_end; cb++)
                for (int64_t row0 = 0; row0 < count; row0 += WR) {
                    multiply_block(v, vplane, row0, up, cb, c, npos, acc_block);
                    if (up2)
                        output_tiles_up2(acc_block, bias, y, first + row0, first + count, h, w, co, 32 * cb);
                    else
                        output_tiles(acc_block, bias, res, y, first + row0, first + count, th, tw, h, w, co, 32 * cb);
                }
        }
    }
}

/* ``res``: NULL, or a channels-last (N, H, W, Co) tensor added to the result (a ResNet block's residual). */
void dr_winograd_conv3x3_bf16(const uint16_t *x, const uint16_t *up, const uint16_t *bias, const uint16_t *res,
                              uint16_t *y, uint16_t *scratch, int n_batch, int h, int w, int c, int co, int64_t group,
                              int col_parts, int threads) {
    winograd(x, up, bias, res, y, scratch, n_batch, h, w, c, co, group, col_parts, threads, 0);
}

void dr_winograd_up2_conv3x3_bf16(const uint16_t *x, const uint16_t *up, const uint16_t *bias, uint16_t *y,
                                  uint16_t *scratch, int n_batch, int h, int w, int c, int co, int64_t group,
                                  int col_parts, int threads) {
    winograd(x, up, bias, NULL, y, scratch, n_batch, h, w, c, co, group, col_parts, threads, 1);
}

/* G g G^T of a (Co, Ci, 3, 3) bf16 weight, in fp32, rounded to bf16 (to nearest even) and packed as the
 * products read it: (Co/32, npos, Ci/2, 32, 2), npos 16, or 9 (the positions a, b in {0, 1, 3}) when
 * ``up2``. Per block of 32 output channels and pair of input channels, the 64 kernels are gathered into
 * lanes (2 o + s, the packed order), transformed together, and each position stored as one run. */
void dr_winograd_weight_bf16(const uint16_t *w, uint16_t *u, int co, int ci, int up2, int threads) {
    static const int up2_positions[9] = {0, 1, 3, 4, 5, 7, 12, 13, 15};
    const int npos = up2 ? 9 : 16, pairs = ci / 2, blocks = co / 32;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t task = 0; task < (int64_t)blocks * pairs; task++) {
        const int ob = (int)(task / pairs), p = (int)(task % pairs);
        float g[9 * 64] __attribute__((aligned(64))), full[16 * 64] __attribute__((aligned(64)));
        for (int o = 0; o < 32; o++)
            for (int s = 0; s < 2; s++) {
                const uint16_t *src = w + ((int64_t)(32 * ob + o) * ci + 2 * p + s) * 9;
                for (int k = 0; k < 9; k++) {
                    const uint32_t bits = (uint32_t)src[k] << 16;
                    memcpy(&g[k * 64 + 2 * o + s], &bits, 4);
                }
            }
        winograd_kernel(g, full, 64);
        for (int k = 0; k < npos; k++) {
            const float *v = full + (up2 ? up2_positions[k] : k) * 64;
            uint16_t *dst = u + (((int64_t)ob * npos + k) * pairs + p) * 64;
            for (int q = 0; q < 4; q++) store_bf16(dst + 16 * q, _mm512_load_ps(v + 16 * q), 0xFFFF);
        }
    }
}
