/* gather.c: a kept channel's work plane: gathered from the input, normalised where the
 * caller fuses a BN-ReLU, scaled by its saliency and zero-padded, split into column phases at
 * stride > 1, as the tiles read it (tile.h). Every ReLU here keeps a NaN, as torch's does. */
#include <string.h>

#include "common.h"

/* Zero what the copy below leaves unwritten in a stride-1 plane: the padding rows, and each
 * interior row's left padding and right padding + tail, instead of writing the whole plane
 * twice (memset, then copy). */
static void zero_border(float *dst, const Shape *s) {
    const int64_t top = s->pad * s->Wph, bottom = (s->pad + s->H) * s->Wph;
    memset(dst, 0, sizeof(float) * top);
    memset(dst + bottom, 0, sizeof(float) * (s->Hp * s->Wph - bottom));
    for (int64_t r = s->pad; r < s->pad + s->H; r++) {
        float *row = dst + r * s->Wph;
        for (int64_t q = 0; q < s->pad; q++) row[q] = 0.0f;
        for (int64_t q = s->pad + s->W; q < s->Wph; q++) row[q] = 0.0f;
    }
}

/* gather_plane's strided case: the plane split into `stride` column phases, padded column
 * q = pos*stride + ph of phase ph holding input column q - pad. Only what a tap reads is
 * written: phases kx % stride and padded rows oy*stride + ky for taps kx, ky < k, so a 1x1
 * stride-2 plane (a downsample conv) gathers a quarter of the input instead of all of it twice
 * over, padded. zero: write zeros only (a pruned tie). */
static void gather_strided(const float *src, float na, float nc, int relu, int zero, float *dst,
                           const Shape *s) {
    const int64_t st = s->stride, phases = s->k < st ? s->k : st;
    for (int64_t ph = 0; ph < phases; ph++) {
        float *dph = dst + ph * s->Hp * s->Wph;
        const int64_t c0 = ((ph - s->pad) % st + st) % st, p0 = (c0 + s->pad - ph) / st;
        for (int64_t pr = 0; pr < s->Hp; pr++) {
            if (pr % st >= s->k) continue; /* no tap reads this row */
            float *drow = dph + pr * s->Wph;
            const int64_t r = pr - s->pad;
            memset(drow, 0, sizeof(float) * s->Wph);
            if (zero || r < 0 || r >= s->H) continue;
            const float *row = src + r * s->W;
            int64_t col = c0, pos = p0;
            if (st == 2) /* eight pixels a step, col .. col + 14: the even lanes of two
                          * vectors, the second from col + 7 (never past the row's end) */
                for (; col + 15 <= s->W; col += 16, pos += 8) {
                    const v8 a = *(const v8u *)(row + col), b = *(const v8u *)(row + col + 7);
                    const v8 v = SHUFFLE8(a, b, 0, 2, 4, 6, 9, 11, 13, 15) * na + nc;
                    *(v8u *)(drow + pos) = relu ? relu8(v) : v;
                }
            for (; col < s->W; col += st, pos++) {
                const float v = row[col] * na + nc;
                drow[pos] = relu ? (v < 0.0f ? 0.0f : v) : v;
            }
        }
    }
}

/* Gather, normalise, scale and zero-pad kept channel t (of B*heads*K) into its work plane dst:
 * dst = scale * f(x[b, idx]) with f = ReLU(bn_a * v + bn_c) when bn_a is given (the layer's
 * BN-ReLU, fused), else f = id. */
DGC_INTERNAL void gather_plane(const float *x, const int64_t *index, const float *scale,
                         const float *bn_a, const float *bn_c, float *dst, const Shape *s,
                         int64_t t) {
    const int64_t b = t / (s->heads * s->K), ch = index[t];
    const float a = scale[t];
    const float *src = x + (b * s->xc + ch) * s->H * s->W;
    /* scale * ReLU(na * v + nc) = ReLU(scale * na * v + scale * nc), as scale >= 0 */
    const float na = a * (bn_a ? bn_a[ch] : 1.0f), nc = bn_a ? a * bn_c[ch] : 0.0f;
    const int64_t hw = s->H * s->W;
    if (a != 0.0f && s->stride == 1 && s->pad == 0 && s->Wph == s->W) {
        /* unpadded rows (1x1 kernels): the plane is the channel as one run, then zeros */
        if (bn_a) {
            for (int64_t q = 0; q < hw; q++) {
                const float v = src[q] * na + nc;
                dst[q] = v < 0.0f ? 0.0f : v;
            }
        } else {
            for (int64_t q = 0; q < hw; q++) dst[q] = src[q] * na;
        }
        memset(dst + hw, 0, sizeof(float) * (s->plane - hw));
        return;
    }
    if (s->stride != 1) {
        gather_strided(src, na, nc, bn_a != NULL, a == 0.0f, dst, s);
        return;
    }
    if (a == 0.0f) { /* a pruned tie: contributes nothing */
        memset(dst, 0, sizeof(float) * s->plane);
        return;
    }
    zero_border(dst, s);
    for (int64_t r = 0; r < s->H; r++) {
        const float *row = src + r * s->W;
        float *drow = dst + (r + s->pad) * s->Wph + s->pad;
        if (bn_a) {
            for (int64_t col = 0; col < s->W; col++) {
                const float v = row[col] * na + nc;
                drow[col] = v < 0.0f ? 0.0f : v;
            }
        } else {
            for (int64_t col = 0; col < s->W; col++) drow[col] = row[col] * na;
        }
    }
}
