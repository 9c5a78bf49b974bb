/* The driver shared by attention_cpu.c (bf16) and attention_f32_cpu.c (fp32): argument checks, K and V
 * packed once per (batch, head) in parallel, then tasks of ROWS query rows of one (batch, head) over
 * the threads, each with its own scratch. The kernels give their element size, packed lengths and
 * scratch size, and two functions; pointers here are bytes.
 */
#ifndef DR_ATTENTION_DRIVE_H
#define DR_ATTENTION_DRIVE_H
#include <stdint.h>
#include <stdlib.h>

#define ROWS 8    /* query rows per task (scores and softmax) */
#define MAX_D 128

typedef struct {
    int size;              /* bytes per element of q, k, v, o */
    size_t kp_len, vp_len; /* packed K and V elements per (batch, head) */
    size_t scratch_bytes;  /* per thread */
    /* K and V of one (batch, head), token strides ks and vs, into kp and vp */
    void (*pack)(const char *k, int64_t ks, const char *v, int64_t vs, int tk, int d, char *kp, char *vp);
    /* nr (<= ROWS) query rows from q (row stride q_stride) into o (row stride o_stride) */
    void (*rows)(const char *q, int64_t q_stride, int nr, int d, int tk, const char *kp, const char *vp, float scale,
                 char *scratch, char *o, int64_t o_stride);
} attention_kernel;

/* q, k, v, o: [b][h][tokens][d] addressed by element strides (last dim contiguous).
 * Returns 0, 1 for an unsupported shape, 2 when memory could not be allocated. */
static int attention_drive(const attention_kernel *kn, const char *q, const char *k, const char *v, char *o, int b,
                           int h, int tq, int tk, int d, const int64_t *qs, const int64_t *ks, const int64_t *vs,
                           const int64_t *os, float scale, int threads) {
    if (d < 1 || d > MAX_D || tq < 1 || tk < 1 || b < 1 || h < 1) return 1;
    if (threads < 1) threads = 1;
    const int bh = b * h, size = kn->size;
    const size_t kp_bytes = kn->kp_len * size, vp_bytes = kn->vp_len * size;
    char *kp = aligned_alloc(64, ((kp_bytes + vp_bytes) * bh + 63) / 64 * 64);
    if (!kp) return 2;
    char *vp = kp + kp_bytes * bh;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int x = 0; x < bh; x++) {
        const int bi = x / h, hi = x % h;
        kn->pack(k + (bi * ks[0] + hi * ks[1]) * size, ks[2], v + (bi * vs[0] + hi * vs[1]) * size, vs[2], tk, d,
                 kp + kp_bytes * x, vp + vp_bytes * x);
    }
    const long blocks = (tq + ROWS - 1) / ROWS;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        char *scratch = aligned_alloc(64, (kn->scratch_bytes + 63) / 64 * 64);
        if (!scratch) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(static)
            for (long t = 0; t < (long)bh * blocks; t++) {
                const int x = (int)(t / blocks), bi = x / h, hi = x % h, i0 = (int)(t % blocks) * ROWS;
                const int nr = tq - i0 < ROWS ? tq - i0 : ROWS;
                kn->rows(q + (bi * qs[0] + hi * qs[1] + (int64_t)i0 * qs[2]) * size, qs[2], nr, d, tk,
                         kp + kp_bytes * x, vp + vp_bytes * x, scale, scratch,
                         o + (bi * os[0] + hi * os[1] + (int64_t)i0 * os[2]) * size, os[2]);
            }
        }
        free(scratch);
    }
    free(kp);
    return failed ? 2 : 0;
}
#endif
