/* fused_eval.c: the saliency generators and the kept-channel selection in C, and a DGC
 * layer's whole eval forward in one call (BN-ReLU, channel means, generators, selection, the
 * kept-channel convolution and its epilogue). The selection also serves the training forward
 * (dgc_select). */
#include <stdint.h>
#include <string.h>

#include "common.h"

/* The mean of f(v[0..n)), f = ReLU(a * v + d) when relu is set, else the identity. Eight
 * partial sums in a vector register: a plain float loop would not be vectorised (the compiler
 * may not reorder a float sum). */
static float plane_mean(const float *v, int64_t n, float a, float d, int relu) {
    const v8 a8 = {a, a, a, a, a, a, a, a}, d8 = {d, d, d, d, d, d, d, d}, zero = {0};
    v8 acc = zero;
    int64_t q = 0;
    for (; q + 8 <= n; q += 8) {
        v8 u = *(const v8u *)(v + q);
        if (relu) {
            u = u * a8 + d8;
            u = (v8)((v8i)u & ~(u < zero)); /* ReLU: zero where u < 0 (NaN stays) */
        }
        acc += u;
    }
    float sum = 0.0f;
    for (int e = 0; e < 8; e++) sum += acc[e];
    for (; q < n; q++) {
        const float u = relu ? v[q] * a + d : v[q];
        sum += relu && u < 0.0f ? 0.0f : u;
    }
    return sum / (float)n;
}

/* Saliencies of one sample and head i: sal[c] = ReLU(b2[i, c] + (fc2_i ReLU(fc1_i z))[c]),
 * z the channel means of the (normalised) input; fc1: (heads, r, C), fc2t: fc2 transposed,
 * (heads, r, C), so that both products run over contiguous C-long rows (the second as r
 * multiply-adds into the C saliencies, which the compiler vectorises). hid: r floats. */
static void saliency(const float *z, const float *fc1, const float *fc2t, const float *b2,
                     int64_t C, int64_t i, int64_t r, float *hid, float *sal) {
    for (int64_t j = 0; j < r; j++) {
        const float acc = dot(fc1 + (i * r + j) * C, z, C);
        hid[j] = acc < 0.0f ? 0.0f : acc;
    }
    /* the hidden units ReLU left non-zero (the others add nothing), four a pass over sal */
    int64_t live[r > 0 ? r : 1], m = 0;
    for (int64_t j = 0; j < r; j++)
        if (hid[j] != 0.0f) live[m++] = j;
    memcpy(sal, b2 + i * C, sizeof(float) * C);
    const float *w0 = fc2t + i * r * C;
    int64_t j = 0;
    for (; j + 4 <= m; j += 4) {
        const float *wa = w0 + live[j] * C, *wb = w0 + live[j + 1] * C;
        const float *wc = w0 + live[j + 2] * C, *wd = w0 + live[j + 3] * C;
        const float ha = hid[live[j]], hb = hid[live[j + 1]];
        const float hc = hid[live[j + 2]], hd = hid[live[j + 3]];
        for (int64_t c = 0; c < C; c++) sal[c] += ha * wa[c] + hb * wb[c] + hc * wc[c] + hd * wd[c];
    }
    for (; j < m; j++) {
        const float h = hid[live[j]], *w = w0 + live[j] * C;
        for (int64_t c = 0; c < C; c++) sal[c] += h * w[c];
    }
    for (int64_t c = 0; c < C; c++) sal[c] = sal[c] < 0.0f ? 0.0f : sal[c];
}

/* The n-th smallest (1-based) of v[0..m): quickselect on a scratch copy. */
static float nth_smallest(const float *v, int64_t m, int64_t n, float *tmp) {
    memcpy(tmp, v, sizeof(float) * m);
    int64_t lo = 0, hi = m - 1, k = n - 1;
    while (lo < hi) {
        const float pivot = tmp[(lo + hi) / 2];
        int64_t a = lo, b = hi;
        while (a <= b) {
            while (tmp[a] < pivot) a++;
            while (tmp[b] > pivot) b--;
            if (a <= b) {
                const float t = tmp[a];
                tmp[a++] = tmp[b];
                tmp[b--] = t;
            }
        }
        if (k <= b) hi = b;
        else if (k >= a) lo = a;
        else break;
    }
    return tmp[k];
}

/* Kept channels of one head: those strictly above the n-th smallest saliency (ties at the
 * threshold go, as in docs/methods.md 1.1). Slots left by ties get a channel with scale 0. With
 * n = 0 every channel is kept: the saliencies are non-negative (the generators end in a
 * ReLU), so the positive ones get their saliency (or 1 under mask) and the zeros 0, as in
 * torch's masked conv. */
static void select_head(const float *sal, int64_t C, int64_t n, int64_t K, int mask,
                        float *tmp, int64_t *index, float *scale) {
    int nan = 0;
    for (int64_t c = 0; c < C; c++) nan |= sal[c] != sal[c];
    if (nan) { /* a NaN input: torch's top-k keeps NaNs first, and its output is NaN too */
        for (int64_t m = 0; m < K; m++) {
            index[m] = m;
            scale[m] = __builtin_nanf("");
        }
        return;
    }
    const float thr = n > 0 ? nth_smallest(sal, C, n, tmp) : 0.0f;
    int64_t m = 0;
    for (int64_t c = 0; c < C && m < K; c++)
        if (sal[c] > thr) {
            index[m] = c;
            scale[m++] = mask ? 1.0f : sal[c];
        }
    for (int64_t c = 0; c < C && m < K; c++)
        if (!(sal[c] > thr)) {
            index[m] = c;
            scale[m++] = 0.0f;
        }
}

/* The training forward's selection: per row of sal (rows x C saliencies), the K = C - n kept
 * channels (select_head's order and ties) and alive[m] = 1 where kept channel m is strictly
 * above the threshold, else 0. Why: torch's top-k of K+1 over (64, 4, 64) took about 0.2 ms a
 * layer on two threads (3 ms of DyResNet-20's 64-batch step); a quickselect per row is a
 * few microseconds. Returns 0, or -1 without scratch memory. */
DGC_API int dgc_select(const float *sal, int64_t rows, int64_t C, int64_t n, int64_t *index,
               float *alive, int threads) {
    const int64_t K = C - n;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *tmp = scratch_slot(1, sizeof(float) * C);
        failed = tmp == NULL;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < rows; t++)
            if (tmp) select_head(sal + t * C, C, n, K, 1, tmp, index + t * K, alive + t * K);
    }
    return failed ? -1 : 0;
}

/* The whole inference forward of a DGC layer: BN-ReLU, channel means, saliency generators,
 * bottom-n deactivation, then the kept-channel convolution into y (B, O, Ho, Wo), through the
 * plan's epilogue (Shape's; res: the residual, laid out as y, or NULL). */
DGC_API int dgc_fused_eval(const FusedPlan *p, const float *x, const float *res, float *y) {
    const int64_t B = p->B, C = p->C, hw = p->H * p->W, heads = p->heads, r = p->r;
    const int64_t K = C - p->n, threads = p->threads;
    Shape s = make_shape(B, C, p->H, p->W, heads, K, p->O, p->k, p->stride, p->pad, p->Ho, p->Wo);
    s.xc = p->xc;
    s.ea = p->ep_a;
    s.ec = p->ep_c;
    s.res = res;
    s.relu = p->ep_relu;
    const int64_t per_head = r + 2 * C; /* hidden, saliencies, selection tmp */
    const int local = local_balances(&s, threads);
    const int64_t planes = local ? 0 : B * heads * K * s.plane;
    float *buf = scratch(sizeof(float) * (B * C + B * heads * per_head + B * heads * K + planes) +
                         sizeof(int64_t) * B * heads * K);
    if (!buf) return -1;
    int64_t *index = (int64_t *)buf; /* B*heads*K kept channels */
    float *z = (float *)(index + B * heads * K), *per = z + B * C;
    float *scale = per + B * heads * per_head, *work = scale + B * heads * K;
    const float *bn_a = p->bn_a, *bn_c = p->bn_c;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < B * C; t++) {
        const int64_t c = t % C;
        const float *v = x + (t / C * p->xc + c) * hw;
        z[t] = plane_mean(v, hw, bn_a ? bn_a[c] : 1.0f, bn_a ? bn_c[c] : 0.0f, !!bn_a);
    }
    /* per (sample, head): the heads' generators are independent, so batch 1 uses every thread */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < B * heads; t++) {
        float *hid = per + t * per_head, *sal = hid + r, *tmp = sal + C;
        saliency(z + t / heads * C, p->fc1, p->fc2t, p->b2, C, t % heads, r, hid, sal);
        select_head(sal, C, p->n, K, p->mask, tmp, index + t * K, scale + t * K);
    }
    if (local) return convolve_local(x, index, scale, bn_a, bn_c, p->weight, y, &s, threads);
    pad_gather(x, index, scale, bn_a, bn_c, work, &s, threads);
    convolve(work, index, p->weight, y, &s, threads);
    return 0;
}
