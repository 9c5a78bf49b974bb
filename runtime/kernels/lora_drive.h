/* What lora_cpu.c (bf16) and lora_f32_cpu.c (fp32) share: the sum of eight vectors' lanes and the work split.
 *
 * The threads split the rows in blocks of LORA_RB; each block computes its rows' down products, then adds
 * their up products onto its output rows: every output is computed by the same instructions whatever the
 * thread count.
 */
#ifndef DR_LORA_DRIVE_H
#define DR_LORA_DRIVE_H
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#define LORA_RB 4       /* rows per block: the up product loads each weight vector once per block */
#define LORA_MAX_R 512  /* the largest rank (runtime/kernels/lora_cpu.py checks) */

/* Eight 16-lane sums as one 8-lane vector: lane q holds the sum of v[q]'s lanes. */
static inline __m256 lora_sum8(const __m512 v[8]) {
    __m256 h[8];
    for (int q = 0; q < 8; q++)
        h[q] = _mm256_add_ps(_mm512_castps512_ps256(v[q]), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v[q]), 1)));
    const __m256 a = _mm256_hadd_ps(h[0], h[1]), b = _mm256_hadd_ps(h[2], h[3]);
    const __m256 c = _mm256_hadd_ps(h[4], h[5]), d = _mm256_hadd_ps(h[6], h[7]);
    const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
    return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}

/* The row pointers of a block of ``rows`` (1..LORA_RB) rows, elements of ``size`` bytes: a block of fewer rows
 * points its spare places at its last row (computed there, stored only once). */
static inline void lora_rows(const void *x0, int64_t ldx, void *out0, int64_t ldo, int rows, int size, const void *xr[],
                             void *orow[]) {
    for (int i = 0; i < LORA_RB; i++) {
        const int64_t at = i < rows ? i : rows - 1;
        xr[i] = (const char *)x0 + at * ldx * size;
        orow[i] = (char *)out0 + at * ldo * size;
    }
}

/* ``rows`` (1..LORA_RB) rows from x0 (row stride ldx) added into out0 (row stride ldo); scratch: LORA_RB rows
 * of n floats, for ranks over 8. */
typedef void (*lora_block_fn)(const void *x0, int64_t ldx, const void *down, const void *up, void *out0, int64_t ldo,
                              int rows, int k, int r, int n, float scale, float *scratch);

/* Elements of ``size`` bytes. Returns 0, or -1 (out untouched) when the scratch rows could not be allocated. */
static int lora_drive(const char *x, int64_t ldx, const void *down, const void *up, char *out, int64_t ldo, int64_t m,
                      int k, int r, int n, float scale, int threads, int size, lora_block_fn block) {
    const int64_t blocks = (m + LORA_RB - 1) / LORA_RB;
    const int parts = threads < blocks ? threads : (int)blocks;
    const int used = parts > 0 ? parts : 1;
    float *scratch = NULL;
    if (r > 8 && !(scratch = malloc(sizeof(float) * LORA_RB * (size_t)n * used))) return -1;
#pragma omp parallel num_threads(used)
    {
        float *mine = scratch ? scratch + (size_t)omp_get_thread_num() * LORA_RB * n : NULL;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t r0 = b * LORA_RB;
            const int rows = m - r0 < LORA_RB ? (int)(m - r0) : LORA_RB;
            block(x + r0 * ldx * size, ldx, down, up, out + r0 * ldo * size, ldo, rows, k, r, n, scale, mine);
        }
    }
    free(scratch);
    return 0;
}
#endif
