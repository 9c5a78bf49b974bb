/* GEGLU activation, bf16, for x86-64 CPUs with AVX512-BF16 (kernels/geglu_cpu.py).
 *
 * out[r, c] = value[r, c] * gelu(gate[r, c]) with value = proj[r, :n], gate = proj[r, n:2n], the
 * exact (erf) GELU computed in fp32 and rounded to bf16 once: eager PyTorch rounds gelu(gate) to
 * bf16, then multiplies and rounds again, and reads and writes the (rows, n) intermediate.
 *
 * erf through erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z/2) (Numerical Recipes' erfcc; fractional
 * error under 1.2e-7 for every z >= 0), so gelu(g) = g (1 - erfc(g / sqrt 2) / 2) for g >= 0 and
 * g erfc(|g| / sqrt 2) / 2 for g < 0.
 */
#include "cpu_math.h"
#include <immintrin.h>
#include <stdint.h>

static inline __m512 gelu_ps(__m512 g) {
    const __m512 z = _mm512_mul_ps(_mm512_abs_ps(g), _mm512_set1_ps(0.70710678118654752f));
    const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(z, _mm512_set1_ps(0.5f), _mm512_set1_ps(1.0f)));
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

/* proj: rows x (2n) with row stride proj_stride; out: rows x n with row stride out_stride. */
void dr_geglu_bf16(const uint16_t *proj, uint16_t *out, int64_t rows, int n, int64_t proj_stride,
                   int64_t out_stride, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *value = proj + r * proj_stride, *gate = value + n;
        uint16_t *o = out + r * out_stride;
        for (int c = 0; c < n; c += 16) {
            const __mmask16 m = tail_mask(n - c);
            const __m512 y = _mm512_mul_ps(load_bf16(value + c, m), gelu_ps(load_bf16(gate + c, m)));
            _mm256_mask_storeu_epi16(o + c, m, (__m256i)_mm512_cvtneps_pbh(y));
        }
    }
}
