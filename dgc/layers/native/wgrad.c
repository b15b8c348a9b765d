/* wgrad.c: the weight gradient of the kept-channel convolution (dgc_direct_conv).
 *
 * Per (sample, head, kept channel): the O/h x k*k kernels' gradient
 *   g_rows[b,i,c][j*kk + t] = sum over output pixels p of gy[b, j*heads + i, p] * work[b,i,c]
 *   at p's tap t,
 * work being the forward's scaled, zero-padded input planes. These are the rows that
 * gathered.kept_rows' weight rows index (the caller sums them into weight_rows with
 * index_add). Why: oneDNN runs the batch-folded grouped conv's weight gradient (B*heads groups
 * of K -> O/h channels) at a few GMAC/s on narrow layers (4-16 kept channels on 32x32 maps).
 * The tile keeps JB outputs x kk taps of partial sums in vector registers over 8-pixel runs
 * (3 x 9 for 3x3 kernels, 8 x 1 for 1x1), so every input vector loaded feeds JB multiply-adds
 * and every gradient vector kk; the partial sums' lanes are summed eight accumulators at a
 * time (lane_sums). At stride 1 the runs are flat: the head's gradient planes are first laid
 * out with the work plane's row pitch, zeros past Wo, so that output pixel q = oy*Wph + ox
 * reads tap t at plane q + off[t] and a run never breaks at a row's end (7x7 and 28x28 maps
 * had a partial run, loaded lane by lane, on every row). */
#include <stdint.h>
#include <string.h>

#include "common.h"

/* The lane sums of eight vectors, as one vector: sum of v[e]'s lanes in lane e. A transpose
 * by halves: three rounds of adding each pair's swapped halves, eight additions in all where
 * summing each vector's lanes apart takes 56. */
static inline v8 lane_sums(const v8 *v) {
    v8 a[4], b[2];
    for (int e = 0; e < 4; e++) { /* lanes 0-3 of a[e]: v[2e]'s pair sums; 4-7: v[2e+1]'s */
        const v8 lo = SHUFFLE8(v[2 * e], v[2 * e + 1], 0, 1, 2, 3, 8, 9, 10, 11);
        const v8 hi = SHUFFLE8(v[2 * e], v[2 * e + 1], 4, 5, 6, 7, 12, 13, 14, 15);
        a[e] = lo + hi;
    }
    for (int e = 0; e < 2; e++) {
        const v8 lo = SHUFFLE8(a[2 * e], a[2 * e + 1], 0, 1, 8, 9, 4, 5, 12, 13);
        const v8 hi = SHUFFLE8(a[2 * e], a[2 * e + 1], 2, 3, 10, 11, 6, 7, 14, 15);
        b[e] = lo + hi;
    }
    /* b[0]'s lanes hold v0 v0 v2 v2 v1 v1 v3 v3's partial sums, b[1]'s v4 ... v7's */
    const v8 lo = SHUFFLE8(b[0], b[1], 0, 4, 2, 6, 8, 12, 10, 14);
    const v8 hi = SHUFFLE8(b[0], b[1], 1, 5, 3, 7, 9, 13, 11, 15);
    return lo + hi;
}

/* Where tap (ky, kx) of output pixel (0, 0) reads a work plane: off[ky*k + kx]. */
static void tap_offsets(const Shape *s, int64_t *off) {
    for (int64_t ky = 0; ky < s->k; ky++)
        for (int64_t kx = 0; kx < s->k; kx++)
            off[ky * s->k + kx] = ((kx % s->stride) * s->Hp + ky) * s->Wph + kx / s->stride;
}

static inline __attribute__((always_inline)) void wgrad_sums(v8 acc[8][9], float *o, const int JB,
                                                             const int KK) {
    int q = 0;
    for (; q + 8 <= JB * KK; q += 8) {
        v8 part[8];
        for (int e = 0; e < 8; e++) part[e] = acc[(q + e) / KK][(q + e) % KK];
        *(v8u *)(o + q) = lane_sums(part);
    }
    for (; q < JB * KK; q++) {
        float sum = 0.0f;
        for (int e = 0; e < 8; e++) sum += acc[q / KK][q % KK][e];
        o[q] = sum;
    }
}

/* One block of JB outputs (j0..) from a gathered plane and gy rows of head i (row pitch Wo). */
static inline __attribute__((always_inline)) void wgrad_block(
    const float *plane, const float *gyi, float *out, const Shape *s, int64_t j0, const int JB,
    const int KK) {
    v8 acc[8][9];
    for (int jj = 0; jj < JB; jj++)
        for (int t = 0; t < KK; t++) acc[jj][t] = (v8){0};
    const int64_t chan = s->heads * s->Ho * s->Wo; /* gy: channel j of head i */
    int64_t off[9];
    tap_offsets(s, off);
    for (int64_t oy = 0; oy < s->Ho; oy++) {
        const float *in = plane + oy * s->stride * s->Wph;
        const float *g = gyi + j0 * chan + oy * s->Wo;
        for (int64_t x0 = 0; x0 < s->Wo; x0 += 8) {
            const int64_t n = s->Wo - x0 < 8 ? s->Wo - x0 : 8;
            v8 gv[8];
            for (int jj = 0; jj < JB; jj++) {
                if (n == 8) {
                    gv[jj] = *(const v8u *)(g + jj * chan + x0);
                } else { /* the row's tail: lanes past Wo stay 0 */
                    gv[jj] = (v8){0};
                    for (int64_t e = 0; e < n; e++) gv[jj][e] = g[jj * chan + x0 + e];
                }
            }
            for (int t = 0; t < KK; t++) {
                const v8 xv = *(const v8u *)(in + off[t] + x0);
                for (int jj = 0; jj < JB; jj++) acc[jj][t] += gv[jj] * xv;
            }
        }
    }
    wgrad_sums(acc, out + j0 * KK, JB, KK);
}

/* wgrad_block at stride 1 over flat runs: gp holds the head's gradient planes with the work
 * plane's pitch (plane j at gp + j*len, len a multiple of 8 floats, zeros past each row's Wo
 * and past the map). */
static inline __attribute__((always_inline)) void wgrad_flat_block(
    const float *plane, const float *gp, int64_t len, float *out, const Shape *s, int64_t j0,
    const int JB, const int KK) {
    v8 acc[8][9];
    for (int jj = 0; jj < JB; jj++)
        for (int t = 0; t < KK; t++) acc[jj][t] = (v8){0};
    int64_t off[9];
    tap_offsets(s, off); /* stride 1: ky*Wph + kx */
    const float *g = gp + j0 * len;
    for (int64_t q = 0; q < len; q += 8) {
        v8 gv[8];
        for (int jj = 0; jj < JB; jj++) gv[jj] = *(const v8 *)(g + jj * len + q);
        for (int t = 0; t < KK; t++) {
            const v8 xv = *(const v8u *)(plane + off[t] + q);
            for (int jj = 0; jj < JB; jj++) acc[jj][t] += gv[jj] * xv;
        }
    }
    wgrad_sums(acc, out + j0 * KK, JB, KK);
}

/* Head i of sample b's gradient planes laid out for wgrad_flat_block: plane j at gp + j*len,
 * rows Wph apart. */
static void flat_gradient(const float *gyi, int64_t oh, const Shape *s, float *gp, int64_t len) {
    const int64_t chan = s->heads * s->Ho * s->Wo;
    for (int64_t j = 0; j < oh; j++) {
        float *d = gp + j * len;
        memset(d, 0, sizeof(float) * len);
        for (int64_t oy = 0; oy < s->Ho; oy++)
            memcpy(d + oy * s->Wph, gyi + j * chan + oy * s->Wo, sizeof(float) * s->Wo);
    }
}

/* The blocks of one (sample, head, kept channel)'s gradient row out (O/h * kk floats). */
static void wgrad_task(const float *plane, const float *gyi, const float *gp, int64_t len,
                       float *out, const Shape *s, int64_t oh) {
    int64_t j0 = 0;
#define WGRAD(JB, KK) (gp ? wgrad_flat_block(plane, gp, len, out, s, j0, JB, KK) \
                          : wgrad_block(plane, gyi, out, s, j0, JB, KK))
    if (s->k == 3) { /* blocks of 3 outputs; a remainder of 1 as 2 + 2 (a 1-block feeds
                        * each loaded input vector to one accumulator only) */
        const int64_t threes = oh % 3 == 1 && oh > 3 ? oh / 3 - 1 : oh / 3;
        for (; j0 < 3 * threes; j0 += 3) WGRAD(3, 9);
        for (; j0 + 2 <= oh; j0 += 2) WGRAD(2, 9);
        for (; j0 < oh; j0++) WGRAD(1, 9);
    } else {
        for (; j0 + 8 <= oh; j0 += 8) WGRAD(8, 1);
        for (; j0 < oh; j0++) WGRAD(1, 1);
    }
#undef WGRAD
}

/* The weight gradient of stride-1 3x3 layers whose rows are whole vectors (W % 8 == 0), read
 * straight from x: the gradient planes of head i are laid out with a zero margin of k-1 (gq:
 * rows Ho + 2m, pitch Wq = Wo + 2m, m = k-1), so that
 *   row[j*9 + t] = scale[b,i,c] * sum over input pixels p of x[b, idx[c], p] *
 *                  gq_j[p's row + pad + m - ky][p's column + pad + m - kx],
 * every input pixel once (out-of-map gradients read the margin's zeros). Why: wgrad_task first
 * gathers each kept channel into a scaled, zero-padded plane (a quarter of its time on 32x32
 * maps), and its flat runs cover the padding columns too (a quarter of the multiply-adds on
 * 8x8 maps, whose runs are 10 wide). Here the scale multiplies the nine sums instead, the x
 * vectors are whole rows, and the tile is CB kept channels x 9 taps in registers (each
 * gradient vector loaded feeds CB multiply-adds, each input vector 9). The sums are added to
 * outs[] (the thread's rows of the weight gradient). */
static inline __attribute__((always_inline)) void wgrad_rows_block(
    const float *const *xs, const float *gq, const int64_t *goff, const Shape *s, int64_t Wq,
    const float *sc, float *const *outs, const int CB) {
    v8 acc[3][9];
    for (int cb = 0; cb < CB; cb++)
        for (int t = 0; t < 9; t++) acc[cb][t] = (v8){0};
    for (int64_t iy = 0; iy < s->H; iy++) {
        const float *g = gq + iy * Wq;
        for (int64_t x0 = 0; x0 < s->W; x0 += 8) {
            v8 xv[3];
            for (int cb = 0; cb < CB; cb++) xv[cb] = *(const v8u *)(xs[cb] + iy * s->W + x0);
            for (int t = 0; t < 9; t++) {
                const v8 gv = *(const v8u *)(g + goff[t] + x0);
                for (int cb = 0; cb < CB; cb++) acc[cb][t] += xv[cb] * gv;
            }
        }
    }
    for (int cb = 0; cb < CB; cb++) {
        if (sc[cb] == 0.0f) continue; /* a pruned tie: contributes nothing */
        float last = 0.0f;
        for (int e = 0; e < 8; e++) last += acc[cb][8][e];
        *(v8u *)outs[cb] += lane_sums(acc[cb]) * sc[cb];
        outs[cb][8] += last * sc[cb];
    }
}

/* Where the gradient row of kept channel c of task bi = (b, i) is added: row (i, index[bi, c])
 * of the weight's row layout, in sum (the thread's accumulator). */
static float *wgrad_dest(float *sum, const int64_t *index, const Shape *s, int64_t bi,
                         int64_t c, int64_t rowlen) {
    return sum + (bi % s->heads * s->C + index[bi * s->K + c]) * rowlen;
}

/* One (sample b, head i) of the direct weight gradient: its gradient planes into gq (oh
 * planes of glen floats), then each block of kept channels against each of them. */
static void wgrad_direct_task(const float *x, const int64_t *index, const float *scale,
                              const float *gy, float *sum, const Shape *s, int64_t bi, float *gq,
                              int64_t Wq, int64_t glen) {
    const int64_t oh = s->O / s->heads, m = s->k - 1, hw = s->H * s->W, b = bi / s->heads;
    const int64_t chan = s->heads * s->Ho * s->Wo; /* gy: channel j of head i */
    const float *gyi = gy + (b * s->O + bi % s->heads) * s->Ho * s->Wo;
    for (int64_t j = 0; j < oh; j++) {
        float *d = gq + j * glen;
        memset(d, 0, sizeof(float) * glen);
        for (int64_t oy = 0; oy < s->Ho; oy++)
            memcpy(d + (oy + m) * Wq + m, gyi + j * chan + oy * s->Wo, sizeof(float) * s->Wo);
    }
    int64_t goff[9];
    for (int64_t ky = 0; ky < 3; ky++)
        for (int64_t kx = 0; kx < 3; kx++) goff[ky * 3 + kx] = (s->pad + m - ky) * Wq + s->pad + m - kx;
    const int64_t *idx = index + bi * s->K;
    int64_t c0 = 0;
    while (c0 < s->K) { /* blocks of 3; a remainder of 1 as 2 + 2 */
        const int64_t left = s->K - c0, cb = left == 4 || left == 2 ? 2 : (left >= 3 ? 3 : 1);
        const float *xs[3], *sc = scale + bi * s->K + c0;
        float *outs[3];
        for (int64_t cc = 0; cc < cb; cc++) xs[cc] = x + (b * s->C + idx[c0 + cc]) * hw;
        for (int64_t j = 0; j < oh; j++) {
            for (int64_t cc = 0; cc < cb; cc++)
                outs[cc] = wgrad_dest(sum, index, s, bi, c0 + cc, oh * 9) + j * 9;
            const float *gj = gq + j * glen;
            if (cb == 3) wgrad_rows_block(xs, gj, goff, s, Wq, sc, outs, 3);
            else if (cb == 2) wgrad_rows_block(xs, gj, goff, s, Wq, sc, outs, 2);
            else wgrad_rows_block(xs, gj, goff, s, Wq, sc, outs, 1);
        }
        c0 += cb;
    }
}

/* One (sample, head) of the gathered weight gradient (strided, 1x1 or ragged layers): its
 * gradient planes (flat ones at stride 1), then each kept channel gathered into plane, its
 * row computed into row and added to its place (wgrad_dest). */
static void wgrad_gathered_task(const float *x, const int64_t *index, const float *scale,
                                const float *gy, float *sum, const Shape *s, int64_t bi,
                                float *plane, float *gp, int64_t len, float *row) {
    const int64_t oh = s->O / s->heads, rowlen = oh * s->k * s->k;
    const float *gyi = gy + (bi / s->heads * s->O + bi % s->heads) * s->Ho * s->Wo;
    if (gp) flat_gradient(gyi, oh, s, gp, len);
    for (int64_t c = 0; c < s->K; c++) {
        float *dst = wgrad_dest(sum, index, s, bi, c, rowlen);
        gather_plane(x, index, scale, NULL, NULL, plane, s, bi * s->K + c);
        wgrad_task(plane, gyi, gp, len, row, s, oh);
        for (int64_t q = 0; q < rowlen; q++) dst[q] += row[q];
    }
}

/* The weight gradient of direct_conv in the weight's row layout, grad_rows (heads*C,
 * O/h*k*k): each (sample, head, kept channel)'s gradient of head i's kernels of that channel,
 * summed into row (i, channel). x: (B, C, H, W) the layer's post-BN-ReLU input; gy: (B, O,
 * Ho, Wo), heads interleaved. Each thread sums into its own accumulator, and the accumulators
 * are then added: the per-channel rows (4.7 MB at DyResNet-20's last stage at batch 64) and
 * torch's index_add of them are never made. k must be 1 or 3. Returns 0, or -1 when the
 * scratch buffer cannot be allocated. */
DGC_API int dgc_wgrad_weight(const float *x, int64_t B, int64_t C, int64_t H, int64_t W,
                     const int64_t *index, const float *scale, int64_t heads, int64_t K,
                     const float *gy, int64_t O, int64_t k, int64_t stride, int64_t pad,
                     int64_t Ho, int64_t Wo, float *grad_rows, int threads) {
    const Shape s = make_shape(B, C, H, W, heads, K, O, k, stride, pad, Ho, Wo);
    const int64_t oh = O / heads, kk = k * k, rowlen = oh * kk, wsize = heads * C * rowlen;
    const int direct = stride == 1 && k == 3 && W % 8 == 0, flat = !direct && stride == 1;
    /* gathered, flat runs: Ho rows of Wph, in runs of 8; a run's taps read up to
     * (k-1)*(Wph+1) + 7 floats past the plane's last pixel run, kept as zeros after the plane */
    const int64_t len = flat ? (Ho * s.Wph + 7) / 8 * 8 : 0;
    const int64_t gap = flat ? (k - 1) * (s.Wph + 1) + 8 : 0, room = (s.plane + gap + 7) / 8 * 8;
    /* direct: the gradient planes with a margin of k-1 */
    const int64_t m = k - 1, Wq = Wo + 2 * m, glen = (Ho + 2 * m) * Wq + 8;
    const size_t bytes = direct ? oh * glen : room + oh * len + rowlen + 8;
    float *parts = scratch(sizeof(float) * threads * wsize);
    if (!parts) return -1;
    int failed = 0, team = 1;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *buf = scratch_slot(1, sizeof(float) * bytes + 32);
        float *sum = parts + omp_thread() * wsize;
        if (omp_thread() == 0) team = (int)omp_threads();
        memset(sum, 0, sizeof(float) * wsize);
        failed = buf == NULL;
        /* gathered: the flat gradient planes 32-byte aligned (their vector loads are) */
        float *gp = buf && flat ? (float *)(((uintptr_t)(buf + room) + 31) & ~(uintptr_t)31) : NULL;
        float *row = buf ? buf + room + oh * len + 8 : NULL;
        if (gp) memset(buf + s.plane, 0, sizeof(float) * (room - s.plane));
#pragma omp for schedule(static)
        for (int64_t bi = 0; bi < B * heads; bi++) {
            if (!buf) continue;
            if (direct) wgrad_direct_task(x, index, scale, gy, sum, &s, bi, buf, Wq, glen);
            else wgrad_gathered_task(x, index, scale, gy, sum, &s, bi, buf, gp, len, row);
        }
    }
    if (failed) return -1;
    const int64_t blocks = (wsize + 1023) / 1024; /* the threads' accumulators added */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t lo = blk * 1024, hi = lo + 1024 < wsize ? lo + 1024 : wsize;
        memcpy(grad_rows + lo, parts + lo, sizeof(float) * (hi - lo));
        for (int t = 1; t < team; t++)
            for (int64_t e = lo; e < hi; e++) grad_rows[e] += parts[t * wsize + e];
    }
    return 0;
}

