/* The work split shared by linear_geglu_cpu.c (bf16) and linear_geglu_f32_cpu.c (fp32).
 *
 * The threads split the blocks of 16 output columns; each walks the rows in groups that stay in its L2
 * (GROUP_BYTES of input) while it runs over its weight columns once per group, so the weights, read
 * from memory, are read once when all the rows fit (every UNet call at 256x256). Every output is
 * computed by the same instructions whatever the thread count.
 */
#ifndef DR_LINEAR_GEGLU_DRIVE_H
#define DR_LINEAR_GEGLU_DRIVE_H
#include <omp.h>
#include <stdint.h>

#define WR 8                      /* rows per block of the products */
#define GROUP_BYTES (512 * 1024)  /* input rows per pass over a thread's weight columns: half this CPU's L2 */

/* Output columns 16 jb.. 16 jb + 15 of ``rows`` (1..WR) rows from x0 (row stride k), weights w of that column block;
 * with r > 0 also the low-rank term of h0's rows (row stride r) and hw, its weights for the block. */
typedef void (*geglu_block_fn)(const void *x0, int rows, int k, const void *w, const void *bias, int d, int jb,
                               void *out0, const void *h0, const void *hw, int r);

/* x (m, k) and out (m, d) row-major, elements of ``size`` bytes; the packed weight holds ``block_weights``
 * elements per column block. h (m, r) row-major and hw (packed as wp, r inputs: 32 r elements per column
 * block) a low-rank term added to the projection (a LoRA adapter's: the kernel sums [x, h] against [w, hw]);
 * r = 0 for none. */
static void linear_geglu_drive(const char *x, const char *wp, const void *bias, char *out, int64_t m, int k, int d,
                               int64_t block_weights, int size, int threads, geglu_block_fn block, const char *h,
                               const char *hw, int r) {
    const int blocks = d / 16;
    const int parts = threads < blocks ? threads : blocks;
    const int64_t fit = GROUP_BYTES / (size * (int64_t)k) / WR * WR, group = fit > WR ? fit : WR;
#pragma omp parallel for num_threads(parts) schedule(static, 1)
    for (int part = 0; part < parts; part++) {
        const int jb0 = (int)((int64_t)blocks * part / parts), jb1 = (int)((int64_t)blocks * (part + 1) / parts);
        for (int64_t g0 = 0; g0 < m; g0 += group) {
            const int64_t g1 = g0 + group < m ? g0 + group : m;
            for (int jb = jb0; jb < jb1; jb++)
                for (int64_t r0 = g0; r0 < g1; r0 += WR)
                    block(x + r0 * k * size, g1 - r0 < WR ? (int)(g1 - r0) : WR, k, wp + jb * block_weights * size,
                          bias, d, jb, out + r0 * d * size, r ? h + r0 * r * size : NULL,
                          r ? hw + (int64_t)jb * 32 * r * size : NULL, r);
        }
    }
}
#endif
