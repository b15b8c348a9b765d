/* pool.c: a DenseNet transition's 2x2 average pool in eval. */
#include <stdint.h>

#include "common.h"

/* nn.AvgPool2d(2, 2) in eval: planes (P, H, W) into (P, H/2, W/2) (floor), both contiguous,
 * each output summed as torch's CPU kernel sums it ((x00 + x01) + x10) + x11, then / 4, so
 * the outputs are torch's to the bit. Why: torch's NCHW CPU pool ran a DenseNet-86 transition
 * at (64, 128, 32, 32) in 8 ms on two threads (about 4 GB/s); channels-last is fast but the
 * copies there and back cost more than it saves. */
DGC_API void dgc_avg_pool2(const float *x, float *y, int64_t planes, int64_t H, int64_t W, int threads) {
    const int64_t Ho = H / 2, Wo = W / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < planes * Ho; t++) {
        const float *a = x + (t / Ho * H + 2 * (t % Ho)) * W, *b = a + W;
        float *out = y + t * Wo;
        int64_t j = 0;
        for (; j + 8 <= Wo; j += 8) { /* 16 input columns: even and odd lanes of two vectors */
            const v8 a0 = *(const v8u *)(a + 2 * j), a1 = *(const v8u *)(a + 2 * j + 8);
            const v8 b0 = *(const v8u *)(b + 2 * j), b1 = *(const v8u *)(b + 2 * j + 8);
            const v8 ae = SHUFFLE8(a0, a1, 0, 2, 4, 6, 8, 10, 12, 14);
            const v8 ao = SHUFFLE8(a0, a1, 1, 3, 5, 7, 9, 11, 13, 15);
            const v8 be = SHUFFLE8(b0, b1, 0, 2, 4, 6, 8, 10, 12, 14);
            const v8 bo = SHUFFLE8(b0, b1, 1, 3, 5, 7, 9, 11, 13, 15);
            *(v8u *)(out + j) = (((ae + ao) + be) + bo) / 4.0f;
        }
        for (; j < Wo; j++) out[j] = (((a[2 * j] + a[2 * j + 1]) + b[2 * j]) + b[2 * j + 1]) / 4.0f;
    }
}
