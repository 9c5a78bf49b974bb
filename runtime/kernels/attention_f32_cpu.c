/* Fused attention forward, fp32, for x86-64 CPUs with AVX-512 (no bf16 needed; runtime/kernels/attention_cpu.py).
 *
 * out[b, h, i, :] = softmax(scale * q[b, h, i, :] . k[b, h, :, :]^T) v[b, h, :, :], fp32 throughout. No mask.
 * The layout of attention_cpu.c (its bf16 sibling): one task is ROWS query rows of one (batch, head), whose
 * scores against every key fit in the core's cache, so the softmax is exact in two passes; K is packed
 * once per (batch, head) with 16 keys per vector (one q value broadcast per FMA), V with 16 head-dim lanes
 * per vector (one probability broadcast per FMA). At SD's head dims (16-64) PyTorch's fp32 flash kernel
 * runs its small matmuls well below this CPU's fp32 rate (measured: bench/RESULTS.md, 'Figures moved
 * from docstrings').
 */
#include "attention_drive.h"
#include "cpu_math.h"
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK 64  /* keys per partial sum of p . v */

/* kp[c * tk16 + j] = k[j][c]; zero past tk. */
static void pack_k(const float *k, int64_t stride, int tk, int d, int tk16, float *kp) {
    memset(kp, 0, sizeof(float) * (size_t)d * tk16);
    for (int j = 0; j < tk; j++)
        for (int c = 0; c < d; c++) kp[(size_t)c * tk16 + j] = k[j * stride + c];
}

/* vp[j * d16 + c] = v[j][c]; zero past d. */
static void pack_v(const float *v, int64_t stride, int tk, int d, int d16, float *vp) {
    memset(vp, 0, sizeof(float) * (size_t)tk * d16);
    for (int j = 0; j < tk; j++) memcpy(vp + (size_t)j * d16, v + j * stride, sizeof(float) * d);
}

/* o rows r0 .. r0 + R - 1 (those < nr) = p rows . v, times each row's 1 / sum; ND vectors of 16 lanes.
 * Keys are summed in chunks of CHUNK in registers, the chunks then added: one running sum over
 * thousands of keys measured above fp32 SDPA's error. */
#define PV_ROWS(ND, R)                                                                                  \
    for (int r0 = 0; r0 < nr; r0 += R) {                                                                \
        __m512 tot[R][ND];                                                                              \
        for (int r = 0; r < R; r++)                                                                     \
            for (int c = 0; c < ND; c++) tot[r][c] = _mm512_setzero_ps();                               \
        for (int j0 = 0; j0 < tk; j0 += CHUNK) {                                                        \
            const int j1 = j0 + CHUNK < tk ? j0 + CHUNK : tk;                                           \
            __m512 acc[R][ND];                                                                          \
            for (int r = 0; r < R; r++)                                                                 \
                for (int c = 0; c < ND; c++) acc[r][c] = _mm512_setzero_ps();                           \
            for (int j = j0; j < j1; j++) {                                                             \
                __m512 vv[ND];                                                                          \
                for (int c = 0; c < ND; c++) vv[c] = _mm512_loadu_ps(vp + (size_t)j * d16 + 16 * c);    \
                for (int r = 0; r < R; r++) {                                                           \
                    const __m512 pb = _mm512_set1_ps(p[(size_t)(r0 + r) * tk16 + j]);                   \
                    for (int c = 0; c < ND; c++) acc[r][c] = _mm512_fmadd_ps(pb, vv[c], acc[r][c]);     \
                }                                                                                       \
            }                                                                                           \
            for (int r = 0; r < R; r++)                                                                 \
                for (int c = 0; c < ND; c++) tot[r][c] = _mm512_add_ps(tot[r][c], acc[r][c]);           \
        }                                                                                               \
        for (int r = 0; r < R && r0 + r < nr; r++)                                                      \
            for (int c = 0; c < ND; c++)                                                                \
                _mm512_mask_storeu_ps(o + (r0 + r) * o_stride + 16 * c, tail_mask(d - 16 * c),          \
                                      _mm512_mul_ps(tot[r][c], _mm512_set1_ps(inv[r0 + r])));           \
    }

/* nr (<= ROWS) query rows of one (batch, head). s and p: ROWS * tk16 floats each. */
static void attend_rows(const float *q, int64_t q_stride, int nr, int d, int tk, int tk16, int d16, const float *kp,
                        const float *vp, float scale, float *s, float *p, float *o, int64_t o_stride) {
    float qv[ROWS * MAX_D], inv[ROWS];
    for (int r = 0; r < ROWS; r++)
        for (int c = 0; c < d; c++) qv[r * d + c] = r < nr ? q[r * q_stride + c] : 0.0f;
    /* raw scores and each row's maximum; the zero-padded keys past tk are left out of the maximum */
    __m512 mx[ROWS];
    for (int r = 0; r < ROWS; r++) mx[r] = _mm512_set1_ps(-INFINITY);
    for (int j = 0; j < tk16; j += 16) {
        __m512 acc[ROWS];
        for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
        for (int c = 0; c < d; c++) {
            const __m512 kv = _mm512_loadu_ps(kp + (size_t)c * tk16 + j);
            for (int r = 0; r < ROWS; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(qv[r * d + c]), kv, acc[r]);
        }
        const __mmask16 valid = tail_mask(tk - j);
        for (int r = 0; r < ROWS; r++) {
            _mm512_storeu_ps(s + (size_t)r * tk16 + j, acc[r]);
            mx[r] = _mm512_mask_max_ps(mx[r], valid, mx[r], acc[r]);
        }
    }
    /* exp(scale * (s - max)), fp32-accurate (exp_ps); the padding keys' weights are 0 */
    const __m512 scale_v = _mm512_set1_ps(scale);
    for (int r = 0; r < nr; r++) {
        const float *sr = s + (size_t)r * tk16;
        float *pr = p + (size_t)r * tk16;
        const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(mx[r]) * scale);
        __m512 sum = _mm512_setzero_ps();
        for (int j = 0; j < tk16; j += 16) {
            const __m512 e = _mm512_maskz_mov_ps(tail_mask(tk - j), exp_ps(_mm512_fmsub_ps(_mm512_loadu_ps(sr + j), scale_v, shift)));
            sum = _mm512_add_ps(sum, e);
            _mm512_storeu_ps(pr + j, e);
        }
        inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
    }
    for (int r = nr; r < ROWS; r++) memset(p + (size_t)r * tk16, 0, sizeof(float) * tk16);
    switch (d16 / 16) {
        case 1: PV_ROWS(1, 8) break;
        case 2: PV_ROWS(2, 4) break;
        case 3: PV_ROWS(3, 4) break;
        case 4: PV_ROWS(4, 4) break;
        case 5: PV_ROWS(5, 2) break;
        case 6: PV_ROWS(6, 2) break;
        case 7: PV_ROWS(7, 2) break;
        default: PV_ROWS(8, 2) break;
    }
}

static void pack(const char *k, int64_t ks, const char *v, int64_t vs, int tk, int d, char *kp, char *vp) {
    pack_k((const float *)k, ks, tk, d, (tk + 15) / 16 * 16, (float *)kp);
    pack_v((const float *)v, vs, tk, d, (d + 15) / 16 * 16, (float *)vp);
}

/* scratch: ROWS * tk16 scores, then ROWS * tk16 probabilities */
static void rows(const char *q, int64_t q_stride, int nr, int d, int tk, const char *kp, const char *vp, float scale,
                 char *scratch, char *o, int64_t o_stride) {
    const int tk16 = (tk + 15) / 16 * 16;
    float *s = (float *)scratch;
    attend_rows((const float *)q, q_stride, nr, d, tk, tk16, (d + 15) / 16 * 16, (const float *)kp, (const float *)vp,
                scale, s, s + (size_t)ROWS * tk16, (float *)o, o_stride);
}

/* The driver: attention_drive.h. */
int dr_attention_f32(const float *q, const float *k, const float *v, float *o, int b, int h, int tq, int tk, int d,
                     const int64_t *qs, const int64_t *ks, const int64_t *vs, const int64_t *os, float scale,
                     int threads) {
    const size_t tk16 = (tk + 15) / 16 * 16, d16 = (d + 15) / 16 * 16;
    const attention_kernel kn = {sizeof(float), (size_t)d * tk16, (size_t)tk * d16, sizeof(float) * ROWS * tk16 * 2,
                                 pack, rows};
    return attention_drive(&kn, (const char *)q, (const char *)k, (const char *)v, (char *)o, b, h, tq, tk, d, qs,
                           ks, vs, os, scale, threads);
}
