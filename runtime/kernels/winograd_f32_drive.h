/* The entry points shared by winograd_f32_cpu.c (AVX-512) and winograd_f32_avx2_cpu.c (AVX2): the task loop
 * of the convolution and the weight transform, the same in both but for the vector width of the helpers the
 * including file defines first: WR, transform_tiles, multiply_block, output_tiles (winograd_math.h's
 * tile_window and winograd_kernel), and WF_ALIGN, the alignment of its vectors' loads in bytes.
 */
#ifndef DR_WINOGRAD_F32_DRIVE_H
#define DR_WINOGRAD_F32_DRIVE_H
#include <omp.h>
#include <stdint.h>
#include <string.h>

/* conv2d(x, g, bias, padding=1) (+ res: NULL, or a channels-last (N, H, W, Co) tensor), y (N, H, W, Co); up =
 * G g G^T packed (Co/32, 16, C, 32). scratch: 16 * group * C floats per thread. Tasks as in winograd_cpu.c. */
void dr_winograd_conv3x3_f32(const float *x, const float *up, const float *bias, const float *res, float *y,
                             float *scratch, int n_batch, int h, int w, int c, int co, int64_t group, int col_parts,
                             int threads) {
    const int th = (h + 1) / 2, tw = (w + 1) / 2;
    const int64_t tiles = (int64_t)n_batch * th * tw, groups = (tiles + group - 1) / group;
    const int col_blocks = co / 32, per_part = (col_blocks + col_parts - 1) / col_parts;
#pragma omp parallel num_threads(threads)
    {
        float *v = scratch + (int64_t)omp_get_thread_num() * 16 * group * c;
        float acc_block[16][WR][32] __attribute__((aligned(WF_ALIGN)));
#pragma omp for schedule(static)
        for (int64_t task = 0; task < groups * col_parts; task++) {
            const int64_t first = task / col_parts * group;
            const int64_t count = tiles - first < group ? tiles - first : group;
            const int64_t vplane = (count + WR - 1) / WR * WR * c;
            const int part = (int)(task % col_parts);
            transform_tiles(x, v, first, count, h, w, c);
            const int cb_end = (part + 1) * per_part < col_blocks ? (part + 1) * per_part : col_blocks;
            for (int cb = part * per_part; cb < cb_end; cb++)
                for (int64_t row0 = 0; row0 < count; row0 += WR) {
                    multiply_block(v, vplane, row0, up, cb, c, acc_block);
                    output_tiles(acc_block, bias, res, y, first + row0, first + count, th, tw, h, w, co, 32 * cb);
                }
        }
    }
}

/* G w G^T of a (Co, Ci, 3, 3) fp32 weight, packed (Co/32, 16, Ci, 32): per block of 32 output channels
 * and input channel, the 32 kernels transformed together (winograd_kernel) and each position stored as one run. */
void dr_winograd_weight_f32(const float *w, float *u, int co, int ci, int threads) {
    const int blocks = co / 32;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t task = 0; task < (int64_t)blocks * ci; task++) {
        const int ob = (int)(task / ci), i = (int)(task % ci);
        float g[9 * 32] __attribute__((aligned(WF_ALIGN))), full[16 * 32] __attribute__((aligned(WF_ALIGN)));
        for (int o = 0; o < 32; o++)
            for (int k = 0; k < 9; k++) g[k * 32 + o] = w[((int64_t)(32 * ob + o) * ci + i) * 9 + k];
        winograd_kernel(g, full, 32);
        for (int k = 0; k < 16; k++) memcpy(u + (((int64_t)ob * 16 + k) * ci + i) * 32, full + k * 32, 32 * sizeof(float));
    }
}
#endif
