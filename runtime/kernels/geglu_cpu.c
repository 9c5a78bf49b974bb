/* GEGLU activation, bf16, for x86-64 CPUs with AVX512-BF16 (runtime/kernels/geglu_cpu.py).
 *
 * out[r, c] = value[r, c] * gelu(gate[r, c]) with value = proj[r, :n], gate = proj[r, n:2n], the
 * exact (erf) GELU computed in fp32 and rounded to bf16 once: eager PyTorch rounds gelu(gate) to
 * bf16, then multiplies and rounds again, and reads and writes the (rows, n) intermediate.
 * The GELU is gelu_ps (gelu_math.h).
 */
#include "cpu_math.h"
#include "gelu_math.h"
#include <immintrin.h>
#include <stdint.h>

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
