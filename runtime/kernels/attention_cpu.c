/* Fused attention forward, bf16, for x86-64 CPUs with AVX512-BF16 (runtime/kernels/attention_cpu.py).
 *
 * out[b, h, i, :] = softmax(scale * q[b, h, i, :] . k[b, h, :, :]^T) v[b, h, :, :]
 * with bf16 inputs and output, fp32 scores, softmax and accumulation. No mask, no dropout.
 *
 * Why it exists: at the head dims of SD-like UNets (16-64) PyTorch's CPU flash kernel spends most
 * of its time outside the matmul units (measured in bench/RESULTS.md). Here one task is a block of
 * ROWS query rows of one (batch, head); its scores against every key fit in the core's cache, so
 * the softmax is exact in two passes (no online rescaling), and both products run on vdpbf16ps:
 *   scores: K is packed once per (batch, head) as dim pairs, 16 keys per vector, one q pair
 *           broadcast per instruction;
 *   p . v:  V is packed as key pairs, 16 head-dim lanes per vector, one p pair broadcast per
 *           instruction, with several independent accumulators (one chain is latency-bound).
 * Threads: OpenMP, which torch's CPU build also uses, so the kernel shares torch's thread pool.
 */
#include "attention_drive.h"
#include "cpu_math.h"
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PVROWS 4  /* rows per pass of the p . v product */

static inline __m512bh broadcast_pair(const uint16_t *at) {
    uint32_t pair;
    memcpy(&pair, at, 4);
    return (__m512bh)_mm512_set1_epi32((int)pair);
}

/* kp[(c/2) * tk16 + j][c % 2] = k[j][c]; zero padding past tk and past d. */
static void pack_k(const uint16_t *k, int64_t stride, int tk, int d, int tk16, uint16_t *kp) {
    memset(kp, 0, sizeof(uint16_t) * 2 * (size_t)((d + 1) / 2) * tk16);
    for (int j = 0; j < tk; j++)
        for (int c = 0; c < d; c++)
            kp[((size_t)(c / 2) * tk16 + j) * 2 + (c & 1)] = k[j * stride + c];
}

/* vp[(j/2) * d16 + c][j % 2] = v[j][c]; zero padding past tk and past d. */
static void pack_v(const uint16_t *v, int64_t stride, int tk, int d, int d16, uint16_t *vp) {
    memset(vp, 0, sizeof(uint16_t) * 2 * (size_t)((tk + 1) / 2) * d16);
    for (int j = 0; j < tk; j++)
        for (int c = 0; c < d; c++)
            vp[((size_t)(j / 2) * d16 + c) * 2 + (j & 1)] = v[j * stride + c];
}

/* o rows r0 .. r0+PVROWS (those < nr) = p16 rows . v, times each row's 1 / sum (kept in inv). */
#define PV_ROWS(ND, SPLIT)                                                                          \
    for (int r0 = 0; r0 < nr; r0 += PVROWS) {                                                       \
        __m512 acc[PVROWS][SPLIT][ND];                                                              \
        for (int r = 0; r < PVROWS; r++)                                                            \
            for (int u = 0; u < SPLIT; u++)                                                         \
                for (int c = 0; c < ND; c++) acc[r][u][c] = _mm512_setzero_ps();                    \
        int jp = 0;                                                                                 \
        for (; jp + SPLIT <= npairs; jp += SPLIT)                                                   \
            for (int u = 0; u < SPLIT; u++) {                                                       \
                __m512bh vv[ND];                                                                    \
                for (int c = 0; c < ND; c++)                                                        \
                    vv[c] = (__m512bh)_mm512_loadu_si512(vp + ((size_t)(jp + u) * d16 + 16 * c) * 2); \
                for (int r = 0; r < PVROWS; r++) {                                                  \
                    __m512bh pb = broadcast_pair(p16 + (size_t)(r0 + r) * prow + 2 * (jp + u));    \
                    for (int c = 0; c < ND; c++) acc[r][u][c] = _mm512_dpbf16_ps(acc[r][u][c], pb, vv[c]); \
                }                                                                                   \
            }                                                                                       \
        for (; jp < npairs; jp++)                                                                   \
            for (int c = 0; c < ND; c++) {                                                          \
                __m512bh vv = (__m512bh)_mm512_loadu_si512(vp + ((size_t)jp * d16 + 16 * c) * 2);  \
                for (int r = 0; r < PVROWS; r++)                                                    \
                    acc[r][0][c] = _mm512_dpbf16_ps(                                                \
                        acc[r][0][c], broadcast_pair(p16 + (size_t)(r0 + r) * prow + 2 * jp), vv);  \
            }                                                                                       \
        for (int r = 0; r < PVROWS && r0 + r < nr; r++) {                                           \
            __m512 scale_r = _mm512_set1_ps(inv[r0 + r]);                                           \
            for (int c = 0; c < ND; c++) {                                                          \
                __m512 a = acc[r][0][c];                                                            \
                for (int u = 1; u < SPLIT; u++) a = _mm512_add_ps(a, acc[r][u][c]);                 \
                int left = d - 16 * c < 16 ? d - 16 * c : 16;                                       \
                __m256bh ob = _mm512_cvtneps_pbh(_mm512_mul_ps(a, scale_r));                        \
                _mm256_mask_storeu_epi16(o + (r0 + r) * o_stride + 16 * c,                          \
                                         (__mmask16)((1u << left) - 1u), (__m256i)ob);             \
            }                                                                                       \
        }                                                                                           \
    }

/* nr (<= ROWS) query rows of one (batch, head). s: ROWS * tk16 floats, p16: ROWS * prow bf16. */
static void attend_rows(const uint16_t *q, int64_t q_stride, int nr, int d, int tk, int tk16, int d16,
                        const uint16_t *kp, const uint16_t *vp, float scale, float *s, uint16_t *p16,
                        uint16_t *o, int64_t o_stride) {
    const int pairs_d = (d + 1) / 2, npairs = (tk + 1) / 2, prow = tk16 + 2;
    float inv[ROWS];
    /* the rows' q as dim pairs, zero past d and for rows past nr: one 32-bit broadcast per product
     * step, and every block computes all ROWS rows (a fixed trip count keeps the accumulators in
     * registers; the padding rows' scores are never read) */
    uint32_t qpairs[ROWS * (MAX_D / 2)];
    for (int r = 0; r < ROWS; r++)
        for (int dp = 0; dp < pairs_d; dp++) {
            uint32_t pair = 0;
            if (r < nr) {
                pair = q[r * q_stride + 2 * dp];
                if (2 * dp + 1 < d) pair |= (uint32_t)q[r * q_stride + 2 * dp + 1] << 16;
            }
            qpairs[r * pairs_d + dp] = pair;
        }
    /* raw scores and each row's maximum, two blocks of 16 keys at a time (each q broadcast feeds
     * two products); the zero-padded keys past tk are left out of the maximum */
    __m512 mx[ROWS];
    for (int r = 0; r < ROWS; r++) mx[r] = _mm512_set1_ps(-INFINITY);
    int j = 0;
    for (; j + 32 <= tk; j += 32) {
        __m512 acc0[ROWS], acc1[ROWS];
        for (int r = 0; r < ROWS; r++) acc0[r] = acc1[r] = _mm512_setzero_ps();
        for (int dp = 0; dp < pairs_d; dp++) {
            const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kp + ((size_t)dp * tk16 + j) * 2);
            const __m512bh k1 = (__m512bh)_mm512_loadu_si512(kp + ((size_t)dp * tk16 + j + 16) * 2);
            for (int r = 0; r < ROWS; r++) {
                const __m512bh qb = (__m512bh)_mm512_set1_epi32((int)qpairs[r * pairs_d + dp]);
                acc0[r] = _mm512_dpbf16_ps(acc0[r], qb, k0);
                acc1[r] = _mm512_dpbf16_ps(acc1[r], qb, k1);
            }
        }
        for (int r = 0; r < ROWS; r++) {
            _mm512_storeu_ps(s + (size_t)r * tk16 + j, acc0[r]);
            _mm512_storeu_ps(s + (size_t)r * tk16 + j + 16, acc1[r]);
            mx[r] = _mm512_max_ps(mx[r], _mm512_max_ps(acc0[r], acc1[r]));
        }
    }
    for (; j < tk16; j += 16) {
        __m512 acc[ROWS];
        for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
        for (int dp = 0; dp < pairs_d; dp++) {
            const __m512bh kv = (__m512bh)_mm512_loadu_si512(kp + ((size_t)dp * tk16 + j) * 2);
            for (int r = 0; r < ROWS; r++)
                acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32((int)qpairs[r * pairs_d + dp]), kv);
        }
        const __mmask16 valid = tail_mask(tk - j);
        for (int r = 0; r < ROWS; r++) {
            _mm512_storeu_ps(s + (size_t)r * tk16 + j, acc[r]);
            mx[r] = _mm512_mask_max_ps(mx[r], valid, mx[r], acc[r]);
        }
    }
    /* exp(scale * (s - max)) = 2^(s * scale * log2(e) - max * scale * log2(e)) */
    const float scale2 = scale * 1.44269504088896341f;
    const __m512 scale_v = _mm512_set1_ps(scale2);
    for (int r = 0; r < nr; r++) {
        float *sr = s + (size_t)r * tk16;
        uint16_t *pr = p16 + (size_t)r * prow;
        const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(mx[r]) * scale2);
        __m512 sum = _mm512_setzero_ps();
        for (int j = 0; j < tk16; j += 16) {
            /* the padding keys' scores are masked to 0 below */
            __m512 e = exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(sr + j), scale_v, shift));
            if (j + 16 > tk) e = _mm512_maskz_mov_ps((__mmask16)((1u << (tk - j)) - 1u), e);
            sum = _mm512_add_ps(sum, e);
            _mm256_storeu_si256((__m256i *)(pr + j), (__m256i)_mm512_cvtneps_pbh(e));
        }
        pr[tk16] = pr[tk16 + 1] = 0;
        inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
    }
    for (int r = nr; r < ROWS; r++) memset(p16 + (size_t)r * prow, 0, sizeof(uint16_t) * prow);
    switch (d16 / 16) {
        case 1: PV_ROWS(1, 2) break;
        case 2: PV_ROWS(2, 2) break;
        case 3: PV_ROWS(3, 1) break;
        case 4: PV_ROWS(4, 1) break;
        case 5: PV_ROWS(5, 1) break;
        case 6: PV_ROWS(6, 1) break;
        case 7: PV_ROWS(7, 1) break;
        default: PV_ROWS(8, 1) break;
    }
}

static void pack(const char *k, int64_t ks, const char *v, int64_t vs, int tk, int d, char *kp, char *vp) {
    pack_k((const uint16_t *)k, ks, tk, d, (tk + 15) / 16 * 16, (uint16_t *)kp);
    pack_v((const uint16_t *)v, vs, tk, d, (d + 15) / 16 * 16, (uint16_t *)vp);
}

/* scratch: ROWS * tk16 fp32 scores, then ROWS * (tk16 + 2) bf16 probabilities */
static void rows(const char *q, int64_t q_stride, int nr, int d, int tk, const char *kp, const char *vp, float scale,
                 char *scratch, char *o, int64_t o_stride) {
    const int tk16 = (tk + 15) / 16 * 16;
    float *s = (float *)scratch;
    attend_rows((const uint16_t *)q, q_stride, nr, d, tk, tk16, (d + 15) / 16 * 16, (const uint16_t *)kp,
                (const uint16_t *)vp, scale, s, (uint16_t *)(s + (size_t)ROWS * tk16), (uint16_t *)o, o_stride);
}

/* The driver: attention_drive.h. */
int dr_attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *o, int b, int h,
                      int tq, int tk, int d, const int64_t *qs, const int64_t *ks, const int64_t *vs,
                      const int64_t *os, float scale, int threads) {
    const size_t tk16 = (tk + 15) / 16 * 16, d16 = (d + 15) / 16 * 16;
    const attention_kernel kn = {sizeof(uint16_t), 2 * (size_t)((d + 1) / 2) * tk16, 2 * (size_t)((tk + 1) / 2) * d16,
                                 sizeof(float) * ROWS * tk16 + sizeof(uint16_t) * ROWS * (tk16 + 2), pack, rows};
    return attention_drive(&kn, (const char *)q, (const char *)k, (const char *)v, (char *)o, b, h, tq, tk, d, qs,
                           ks, vs, os, scale, threads);
}
