/* Vector helpers shared by our AVX512-BF16 CPU kernels (attention_cpu.c, geglu_cpu.c, group_norm_cpu.c). */
#ifndef DR_CPU_MATH_H
#define DR_CPU_MATH_H
#include <immintrin.h>
#include <stdint.h>

/* exp(x) for x <= 88: 2^n * p(r), n = round(x / ln 2), r = x - n ln 2 in two parts, p degree 6;
 * arguments below -87 give exp(-87) (about 1.6e-38: zero for every use here). */
static inline __m512 exp_ps(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* 2^t for finite t <= 128: 2^n * p(f), n = round(t), f = t - n in [-1/2, 1/2], p the degree-4 Taylor
 * polynomial of 2^f (relative error below 5e-5: a fortieth of a bf16 rounding step, which is what
 * the softmax numerators it feeds are rounded to). Below t = -149 it gives 0. */
static inline __m512 exp2_ps(__m512 t) {
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(9.6181291e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* 1 / d for finite d > 0 (to 1e38): vrcp14ps refined by one Newton step, relative error about 2^-27, at a
 * fraction of a division's cost. */
static inline __m512 recip_ps(__m512 d) {
    const __m512 r0 = _mm512_rcp14_ps(d);
    return _mm512_fmadd_ps(r0, _mm512_fnmadd_ps(d, r0, _mm512_set1_ps(1.0f)), r0);
}

/* Up to 16 bf16 values (lanes in m) as fp32. */
static inline __m512 load_bf16(const uint16_t *at, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, at)), 16));
}

/* The first min(left, 16) lanes. */
static inline __mmask16 tail_mask(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
}
#endif
