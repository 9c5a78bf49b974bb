/* The exact (erf) GELU in fp32 for our AVX512 kernels (geglu_cpu.c, linear_geglu_cpu.c).
 *
 * erf through erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z/2) (Numerical Recipes' erfcc; fractional
 * error under 1.2e-7 for every z >= 0), so gelu(g) = g (1 - erfc(g / sqrt 2) / 2) for g >= 0 and
 * g erfc(|g| / sqrt 2) / 2 for g < 0: accurate in the far negative tail, where 1 + erf(x) cancels.
 * t comes from recip_ps (relative error about 2^-27).
 */
#ifndef DR_GELU_MATH_H
#define DR_GELU_MATH_H
#include "cpu_math.h"

static inline __m512 gelu_ps(__m512 g) {
    const __m512 z = _mm512_mul_ps(_mm512_abs_ps(g), _mm512_set1_ps(0.70710678118654752f));
    const __m512 t = recip_ps(_mm512_fmadd_ps(z, _mm512_set1_ps(0.5f), _mm512_set1_ps(1.0f)));
    static const float c[10] = {-1.26551223f, 1.00002368f, 0.37409196f, 0.09678418f, -0.18628806f,
                                0.27886807f, -1.13520398f, 1.48851587f, -0.82215223f, 0.17087277f};
    __m512 p = _mm512_set1_ps(c[9]);
    for (int i = 8; i >= 0; i--) p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(c[i]));
    const __m512 half_erfc = _mm512_mul_ps(_mm512_set1_ps(0.5f),
                                           _mm512_mul_ps(t, exp_ps(_mm512_fnmadd_ps(z, z, p))));
    const __mmask16 neg = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 factor = _mm512_mask_blend_ps(neg, _mm512_sub_ps(_mm512_set1_ps(1.0f), half_erfc), half_erfc);
    return _mm512_mul_ps(g, factor);
}
#endif
