/* tile.h: the register tiles of the direct convolution, shared by the forward (forward.c)
 * and the input gradient (igrad.c): JB (or CB) channels x R rows x 8*NV columns of partial
 * sums kept in vector registers, inlined into each caller at its compiled shapes. */
#ifndef DGC_TILE_H
#define DGC_TILE_H

#include "common.h"

/* Shape's epilogue on one output channel o's tile acc (R rows of NV vectors, n valid columns,
 * rows valid rows): res points at the tile's first value in the residual (rows Wo apart). */
static inline __attribute__((always_inline)) void epilogue(v8 *acc, const Shape *s, int64_t o,
                                                           const float *res, const int R,
                                                           const int NV, int64_t n,
                                                           int64_t rows) {
    const float a = s->ea ? s->ea[o] : 1.0f, c = s->ea ? s->ec[o] : 0.0f;
    for (int rq = 0; rq < R && rq < rows; rq++)
        for (int q = 0; q < NV; q++) {
            v8 v = acc[rq * NV + q];
            if (s->ea) v = v * a + c;
            if (res) {
                const float *r = res + rq * s->Wo + 8 * q;
                if (n == 8 * NV) {
                    v += *(const v8u *)r;
                } else { /* a partial tile: no read past the row (or the tensor) */
                    for (int e = 0; e < 8 && 8 * q + e < n; e++) v[e] += r[e];
                }
            }
            acc[rq * NV + q] = s->relu ? relu8(v) : v;
        }
}

/* One tile: JB output channels x R output rows (oy..) x 8*NV columns (x0..), summed over kept
 * channels and taps in vector registers, then stored (interleaved) to y. Every input vector
 * loaded feeds JB multiply-adds and every weight broadcast R*NV. */
static inline __attribute__((always_inline)) void tile(
    const float *planes, const float *wrows, const int64_t *idx, float *y, const Shape *s,
    int64_t b, int64_t i, int64_t j0, int64_t oy, int64_t x0, const int JB, const int R,
    const int NV) {
    v8 acc[4][MAX_VEC];
    for (int jj = 0; jj < JB; jj++)
        for (int q = 0; q < R * NV; q++) acc[jj][q] = (v8){0};
    const int64_t oh = s->O / s->heads, kk = s->k * s->k, row = oh * kk;
    int64_t off[MAX_TAPS], voff[MAX_VEC];
    for (int64_t ky = 0; ky < s->k; ky++)
        for (int64_t kx = 0; kx < s->k; kx++)
            off[ky * s->k + kx] = ((kx % s->stride) * s->Hp + oy * s->stride + ky) * s->Wph + x0 +
                                  kx / s->stride;
    for (int q = 0; q < R * NV; q++) voff[q] = (q / NV) * s->stride * s->Wph + (q % NV) * 8;
    for (int64_t c = 0; c < s->K; c++) {
        const float *plane = planes + c * s->plane;
        const float *wc = wrows + idx[c] * row; /* [jj][tap]: JB*kk contiguous floats */
        for (int64_t t = 0; t < kk; t++) {
            const float *in = plane + off[t];
            v8 xv[MAX_VEC];
            for (int q = 0; q < R * NV; q++) xv[q] = *(const v8u *)(in + voff[q]);
            for (int jj = 0; jj < JB; jj++) {
                const float w = wc[jj * kk + t];
                for (int q = 0; q < R * NV; q++) acc[jj][q] += w * xv[q];
            }
        }
    }
    const int64_t n = s->Wo - x0 < 8 * NV ? s->Wo - x0 : 8 * NV;
    for (int jj = 0; jj < JB; jj++) {
        const int64_t o = (j0 + jj) * s->sj + i * s->si, at = (b * s->yc + o) * s->Ho * s->Wo;
        if (s->ea || s->res || s->relu) {
            epilogue(acc[jj], s, o, s->res ? s->res + at + oy * s->Wo + x0 : NULL, R, NV, n,
                     s->Ho - oy);
        }
        for (int rq = 0; rq < R && oy + rq < s->Ho; rq++) {
            float *out = y + at + (oy + rq) * s->Wo + x0;
            if (n == 8 * NV) { /* a full tile row: vector stores */
                for (int q = 0; q < NV; q++) *(v8u *)(out + 8 * q) = acc[jj][rq * NV + q];
            } else {
                for (int64_t v = 0; v < n; v++) out[v] = ((const float *)&acc[jj][rq * NV])[v];
            }
        }
    }
}

#define TILE_CASE(JBV, RV, NVV)                                                               \
    if (jb == JBV && R == RV) {                                                               \
        for (int64_t oy = 0; oy < s->Ho; oy += RV)                                            \
            for (int64_t x0 = 0; x0 < s->Wo; x0 += 8 * NVV)                                   \
                tile(planes, wrows, idx, y, s, b, i, j0, oy, x0, JBV, RV, NVV);               \
        return;                                                                               \
    }

/* The tile shapes that are compiled, (output channels or kept channels a block, rows, vectors
 * a row): one list for the forward's and the input gradient's dispatch. */
#define FOR_EACH_TILE(CASE)                                                                   \
    CASE(4, NARROW_ROWS, 1)                                                                   \
    CASE(4, WIDE_ROWS, 2)                                                                     \
    CASE(2, NARROW_ROWS, 1)                                                                   \
    CASE(2, WIDE_ROWS, 2)                                                                     \
    CASE(1, NARROW_ROWS, 1)                                                                   \
    CASE(1, WIDE_ROWS, 2)

/* CB planes' tiles of R rows x 8*NV columns at (oy, x0), from acc into out (CB planes of
 * h x w; rows and columns past the plane are dropped). */
static inline __attribute__((always_inline)) void store_tiles(v8 acc[4][MAX_VEC], float *out,
                                                              int64_t h, int64_t w, int64_t oy,
                                                              int64_t x0, const int CB,
                                                              const int R, const int NV) {
    const int64_t n = w - x0 < 8 * NV ? w - x0 : 8 * NV;
    for (int cc = 0; cc < CB; cc++)
        for (int rq = 0; rq < R && oy + rq < h; rq++) {
            float *o = out + cc * h * w + (oy + rq) * w + x0;
            if (n == 8 * NV) {
                for (int q = 0; q < NV; q++) *(v8u *)(o + 8 * q) = acc[cc][rq * NV + q];
            } else {
                for (int64_t v = 0; v < n; v++) o[v] = ((const float *)&acc[cc][rq * NV])[v];
            }
        }
}

#endif
