/* The F(2x2, 3x3) transforms shared by winograd_cpu.c (bf16) and winograd_f32_cpu.c (fp32), on fp32
 * vectors of 16 channels; B^T, A^T as in winograd_cpu.c's header comment. */
#ifndef DR_WINOGRAD_MATH_H
#define DR_WINOGRAD_MATH_H
#include <immintrin.h>
#include <stdint.h>

/* Batch item and top-left corner (row, column; -1 for the padded border) of tile t's 4x4 input window. */
static inline void tile_window(int64_t t, int th, int tw, int *n, int *r0, int *c0) {
    const int64_t per_image = (int64_t)th * tw, rest = t % per_image;
    *n = (int)(t / per_image);
    *r0 = 2 * (int)(rest / tw) - 1;
    *c0 = 2 * (int)(rest % tw) - 1;
}

/* Tile t's 4x4 input window in a channels-last (N, H, W, C) map of (H + 1) / 2 x (W + 1) / 2 tiles per
 * image: the element offset of each window row's start (-1 above or below the map) and each window
 * column (-1 left or right of it); outside is zero padding. */
static inline void tile_rows_cols(int64_t t, int h, int w, int c, int64_t row_at[4], int col[4]) {
    int n, r0, c0;
    tile_window(t, (h + 1) / 2, (w + 1) / 2, &n, &r0, &c0);
    for (int a = 0; a < 4; a++) {
        row_at[a] = (r0 + a >= 0 && r0 + a < h) ? ((int64_t)n * h + r0 + a) * w * c : -1;
        col[a] = (c0 + a >= 0 && c0 + a < w) ? c0 + a : -1;
    }
}

/* t[4a + b] = (B^T d B)[a][b] of one 4x4 window d. */
static inline void winograd_input(__m512 d[4][4], __m512 t[16]) {
    __m512 e[4][4];  /* B^T d: combine rows */
    for (int b = 0; b < 4; b++) {
        e[0][b] = _mm512_sub_ps(d[0][b], d[2][b]);
        e[1][b] = _mm512_add_ps(d[1][b], d[2][b]);
        e[2][b] = _mm512_sub_ps(d[2][b], d[1][b]);
        e[3][b] = _mm512_sub_ps(d[1][b], d[3][b]);
    }
    for (int a = 0; a < 4; a++) {  /* (B^T d) B: combine columns */
        t[4 * a] = _mm512_sub_ps(e[a][0], e[a][2]);
        t[4 * a + 1] = _mm512_add_ps(e[a][1], e[a][2]);
        t[4 * a + 2] = _mm512_sub_ps(e[a][2], e[a][1]);
        t[4 * a + 3] = _mm512_sub_ps(e[a][1], e[a][3]);
    }
}

/* y[2i + j] = (A^T m A)[i][j] + bias for the 16 products m[4a + b] of one tile. */
static inline void winograd_output(const __m512 m[16], __m512 bias, __m512 y[4]) {
    __m512 s[2][4];  /* A^T m: combine rows */
    for (int j = 0; j < 4; j++) {
        s[0][j] = _mm512_add_ps(_mm512_add_ps(m[j], m[4 + j]), m[8 + j]);
        s[1][j] = _mm512_sub_ps(_mm512_sub_ps(m[4 + j], m[8 + j]), m[12 + j]);
    }
    for (int i = 0; i < 2; i++) {  /* (A^T m) A: combine columns */
        y[2 * i] = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(s[i][0], s[i][1]), s[i][2]), bias);
        y[2 * i + 1] = _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(s[i][1], s[i][2]), s[i][3]), bias);
    }
}
/* G g G^T, the kernel transform, of ``lanes`` 3x3 kernels at once: tap k (row-major) of kernel l at
 * g[k * lanes + l], position k of its transform at full[k * lanes + l]. Rows first, then columns; the
 * halvings are exact in binary. The loop over lanes vectorizes. */
static inline void winograd_kernel(const float *g, float *full, int lanes) {
    for (int l = 0; l < lanes; l++) {
        float t[4][3];
        for (int c = 0; c < 3; c++) {  /* G g: rows */
            const float g0 = g[c * lanes + l], g1 = g[(3 + c) * lanes + l], g2 = g[(6 + c) * lanes + l];
            t[0][c] = g0;
            t[1][c] = (g0 + g1 + g2) * 0.5f;
            t[2][c] = (g0 - g1 + g2) * 0.5f;
            t[3][c] = g2;
        }
        for (int r = 0; r < 4; r++) {  /* (G g) G^T: columns */
            full[(4 * r) * lanes + l] = t[r][0];
            full[(4 * r + 1) * lanes + l] = (t[r][0] + t[r][1] + t[r][2]) * 0.5f;
            full[(4 * r + 2) * lanes + l] = (t[r][0] - t[r][1] + t[r][2]) * 0.5f;
            full[(4 * r + 3) * lanes + l] = t[r][2];
        }
    }
}
#endif
