/* bn.c: a DGC layer's training BatchNorm + ReLU with the gate's pooling, and its backward. */
#include <math.h>
#include <stdint.h>

#include "common.h"

/* Sum of v[0..n) in four vector accumulators. */
static double plane_sum(const float *v, int64_t n) {
    v8 acc0 = {0}, acc1 = {0}, acc2 = {0}, acc3 = {0};
    int64_t q = 0;
    for (; q + 32 <= n; q += 32) {
        acc0 += *(const v8u *)(v + q);
        acc1 += *(const v8u *)(v + q + 8);
        acc2 += *(const v8u *)(v + q + 16);
        acc3 += *(const v8u *)(v + q + 24);
    }
    for (; q + 8 <= n; q += 8) acc0 += *(const v8u *)(v + q);
    acc0 += acc1 + acc2 + acc3;
    double sum = 0.0;
    for (int e = 0; e < 8; e++) sum += acc0[e];
    for (; q < n; q++) sum += v[q];
    return sum;
}

/* Sum of (v[q] - m)^2 over q < n. */
static double plane_sq_dev(const float *v, int64_t n, float m) {
    const v8 m8 = {m, m, m, m, m, m, m, m};
    v8 acc0 = {0}, acc1 = {0};
    int64_t q = 0;
    for (; q + 16 <= n; q += 16) {
        const v8 d0 = *(const v8u *)(v + q) - m8, d1 = *(const v8u *)(v + q + 8) - m8;
        acc0 += d0 * d0;
        acc1 += d1 * d1;
    }
    for (; q + 8 <= n; q += 8) {
        const v8 d0 = *(const v8u *)(v + q) - m8;
        acc0 += d0 * d0;
    }
    acc0 += acc1;
    double sum = 0.0;
    for (int e = 0; e < 8; e++) sum += acc0[e];
    for (; q < n; q++) sum += (double)(v[q] - m) * (v[q] - m);
    return sum;
}

/* Per channel, the sum over samples of part[b*C + c], in sample order (deterministic). */
static void channel_totals(const double *part, int64_t B, int64_t C, double *out) {
    for (int64_t c = 0; c < C; c++) out[c] = 0.0;
    for (int64_t b = 0; b < B; b++)
        for (int64_t c = 0; c < C; c++) out[c] += part[b * C + c];
}

/* Training BatchNorm (batch statistics) + ReLU of a DGC layer's input x (B, C, HW), with the
 * per-plane sums of the output (the gate's pooling): y = max(a*x + d, 0), a = w/sqrt(var+eps),
 * d = bias - mean*a (w, bias NULL: 1, 0); zsum[b, c] = sum of y's plane; mean and the biased
 * var per channel out. Two read passes for the statistics (mean, then squared deviations,
 * as torch's CPU kernel), one for the output. Why: torch's training BN runs at a tenth of
 * memory speed on these NCHW shapes (docs/benchmarks.md 6.3). Returns 0, or -1 without
 * scratch memory. */
DGC_API int dgc_bn_relu_train(const float *x, int64_t B, int64_t C, int64_t HW, const float *w,
                      const float *bias, float eps, float *y, float *zsum, float *mean,
                      float *var, int threads) {
    double *part = scratch(sizeof(double) * (B * C + C));
    if (!part) return -1;
    double *tot = part + B * C;
    const double n = (double)B * (double)HW;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < B * C; t++) part[t] = plane_sum(x + t * HW, HW);
    channel_totals(part, B, C, tot);
    for (int64_t c = 0; c < C; c++) mean[c] = (float)(tot[c] / n);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < B * C; t++) part[t] = plane_sq_dev(x + t * HW, HW, mean[t % C]);
    channel_totals(part, B, C, tot);
    for (int64_t c = 0; c < C; c++) var[c] = (float)(tot[c] / n);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < B * C; t++) {
        const int64_t c = t % C;
        const float a = (w ? w[c] : 1.0f) / sqrtf(var[c] + eps);
        const float d = (bias ? bias[c] : 0.0f) - mean[c] * a;
        const float *src = x + t * HW;
        float *dst = y + t * HW;
        for (int64_t q = 0; q < HW; q++) {
            const float v = src[q] * a + d;
            dst[q] = v < 0.0f ? 0.0f : v;
        }
        zsum[t] = (float)plane_sum(dst, HW);
    }
    return 0;
}

/* The backward of dgc_bn_relu_train: with g = (gy + gz[b, c]) where y > 0, else 0 (gz: the
 * gradient of zsum, NULL for none) and xh = (x - mean) * invstd,
 *   gx = a * (g - mean(g) - xh * mean(g * xh)),  gw = sum(g * xh),  gb = sum(g)
 * per channel (means over B*HW), a = w * invstd. Two passes: the sums, then gx. gw and gb may
 * be NULL. Returns 0, or -1 without scratch memory. */
DGC_API int dgc_bn_relu_train_backward(const float *gy, const float *gz, const float *x, int64_t B,
                               int64_t C, int64_t HW, const float *mean, const float *invstd,
                               const float *w, const float *bias, float *gx, float *gw,
                               float *gb, int threads) {
    double *part = scratch(sizeof(double) * (2 * B * C + 2 * C));
    if (!part) return -1;
    double *part2 = part + B * C, *sg = part2 + B * C, *sgx = sg + C;
    const double n = (double)B * (double)HW;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < B * C; t++) {
        const int64_t c = t % C;
        const float is = invstd[c], m = mean[c], a = (w ? w[c] : 1.0f) * is;
        const float d = (bias ? bias[c] : 0.0f) - m * a, extra = gz ? gz[t] : 0.0f;
        const float *xs = x + t * HW, *g = gy + t * HW;
        v8 s1 = {0}, s2 = {0};
        const v8 a8 = {a, a, a, a, a, a, a, a}, d8 = {d, d, d, d, d, d, d, d};
        const v8 e8 = {extra, extra, extra, extra, extra, extra, extra, extra};
        const v8 m8 = {m, m, m, m, m, m, m, m}, zero = {0};
        int64_t q = 0;
        for (; q + 8 <= HW; q += 8) {
            const v8 xv = *(const v8u *)(xs + q);
            v8 gv = *(const v8u *)(g + q) + e8;
            gv = (v8)((v8i)gv & (xv * a8 + d8 > zero)); /* ReLU's mask */
            s1 += gv;
            s2 += gv * (xv - m8);
        }
        double t1 = 0.0, t2 = 0.0;
        for (int e = 0; e < 8; e++) t1 += s1[e], t2 += s2[e];
        for (; q < HW; q++) {
            const float gv = xs[q] * a + d > 0.0f ? g[q] + extra : 0.0f;
            t1 += gv;
            t2 += gv * (xs[q] - m);
        }
        part[t] = t1;
        part2[t] = t2 * is;
    }
    channel_totals(part, B, C, sg);
    channel_totals(part2, B, C, sgx);
    if (gb)
        for (int64_t c = 0; c < C; c++) gb[c] = (float)sg[c];
    if (gw)
        for (int64_t c = 0; c < C; c++) gw[c] = (float)sgx[c];
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < B * C; t++) {
        const int64_t c = t % C;
        const float is = invstd[c], m = mean[c], a = (w ? w[c] : 1.0f) * is;
        const float d = (bias ? bias[c] : 0.0f) - m * a, extra = gz ? gz[t] : 0.0f;
        const float mg = (float)(sg[c] / n), mgx = (float)(sgx[c] / n);
        const float *xs = x + t * HW, *g = gy + t * HW;
        float *out = gx + t * HW;
        for (int64_t q = 0; q < HW; q++) {
            const float gv = xs[q] * a + d > 0.0f ? g[q] + extra : 0.0f;
            out[q] = a * (gv - mg - (xs[q] - m) * is * mgx);
        }
    }
    return 0;
}
