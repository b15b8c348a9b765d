/* forward.c: direct convolution over each sample's kept channels (the DGC layer's forward, in
 * eval and in training), and a static group convolution on the same tiles.
 *
 * Computes, per sample b and head i, y[b, j*heads + i] = sum over the K kept channels c of
 * scale[b,i,c] * conv(x[b, index[b,i,c]], W[i*O/h + j, index[b,i,c]]) for the O/h outputs j of
 * head i: the kept-channel convolution of dgc.layers.gathered, heads already interleaved.
 *
 * Why: per-sample channel sets give every (sample, head) pair its own small convolution
 * (4-16 channels on a CIFAR ResNet), which oneDNN and BLAS run far below their dense speed, and
 * the torch ops around them (gathers, kernel layouts, the interleave) cost more than the
 * convolution itself at batch 1. Here one call does the gather, the saliency scaling, the
 * padding, the convolution and the interleave. The inner tile keeps JB output channels x R
 * rows x 8*NV columns in vector registers over all kept channels and taps, so every input
 * vector loaded feeds JB fused multiply-adds, and reads each kept channel's kernels for its
 * output block as one contiguous run of the weight in row layout (gathered.weight_rows: row
 * i*C + c holds head i's kernels of input channel c as (O/h, k*k)), which the caller keeps.
 * Plain C with GCC vector extensions.
 *
 * Layout of the work buffer: per (b, i, c) the scaled, zero-padded input plane, split into
 * `stride` column phases so that a strided convolution reads contiguous columns. Where the
 * (sample, head) pairs share the threads evenly, each thread gathers one pair's planes into
 * its own scratch and convolves them at once (convolve_local), while they are in its cache.
 * Dilation 1 only. float32, contiguous tensors, except that the eval forwards' input (and the
 * group conv's output) may be a channel slice of a wider tensor. Every ReLU here keeps a NaN,
 * as torch's does (a NaN input must give a NaN output and loss, not zeros).
 */
#include <stdint.h>

#include "common.h"
#include "tile.h"

/* Every kept channel's work plane: work[t] for t < B*heads*K. */
DGC_INTERNAL void pad_gather(const float *x, const int64_t *index, const float *scale,
                       const float *bn_a, const float *bn_c, float *work, const Shape *s,
                       int threads) {
    const int64_t n = s->B * s->heads * s->K;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < n; t++)
        gather_plane(x, index, scale, bn_a, bn_c, work + t * s->plane, s, t);
}

/* Output block j0..j0+jb of head i of sample b, from that (b, i)'s K work planes; wrows: head
 * i's rows at output j0 (row c of the block starts at wrows + c*oh*kk). */
static inline __attribute__((always_inline)) void conv_block(
    const float *planes, const float *wrows, const int64_t *idx, float *y, const Shape *s,
    int64_t b, int64_t i, int64_t j0, int64_t jb, int64_t R) {
    FOR_EACH_TILE(TILE_CASE)
}

/* The convolution of every (sample, head, output block) from the gathered work planes.
 * rows: the weight in row layout, (heads*C, O/h*k*k). */
DGC_INTERNAL void convolve(const float *work, const int64_t *index, const float *rows, float *y,
                     const Shape *s, int threads) {
    const int64_t oh = s->O / s->heads, R = tile_rows(s->Wo), kk = s->k * s->k;
    const int64_t jb = block_size(oh), blocks = oh / jb;
    const int64_t n = s->B * s->heads * blocks;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < n; t++) {
        const int64_t j0 = t % blocks * jb, bi = t / blocks;
        const float *planes = work + bi * s->K * s->plane;
        conv_block(planes, rows + bi % s->heads * s->C * oh * kk + j0 * kk, index + bi * s->K,
                   y, s, bi / s->heads, bi % s->heads, j0, jb, R);
    }
}

/* Prefetch the weights that output block j0 (jb outputs) of a head reads: jb*kk floats of each
 * kept channel's row. Only a block's first tile reads them from memory (the later ones find
 * them in cache), so on small maps (two tiles a block on 7x7) a block would otherwise wait on
 * its weights, which a whole network's forward brings from DRAM (not from the cache, as when
 * one layer is timed alone). */
static inline void prefetch_block(const float *wi, const int64_t *idx, int64_t K, int64_t row,
                                  int64_t j0, int64_t jb, int64_t kk) {
    const int64_t bytes = (int64_t)sizeof(float) * jb * kk;
    for (int64_t c = 0; c < K; c++) {
        const char *w = (const char *)(wi + idx[c] * row + j0 * kk);
        for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(w + off, 0, 3);
    }
}

/* Read a head's K kept weight rows (row floats each) once, in order, one load per cache line,
 * up to WARM_BYTES: in a network's forward they come from DRAM, and the tiles read each row
 * a block (144 bytes on a 3x3 layer) at a time across all K rows, far more streams than the
 * hardware prefetcher follows. Read in order first, they arrive at streaming speed and stay
 * in L2 for the tiles. Measured on ResNet-18's 7x7 layers at batch 1 (590 KB a head): 0.79-
 * 0.83 ms a layer against 1.0-1.07 without, and against 0.95-1.08 with the same rows
 * software-prefetched (docs/benchmarks.md 6.1, sixth round). */
#define WARM_BYTES (1 << 20)
typedef uint32_t __attribute__((may_alias)) u32a;
static void warm_rows(const float *wi, const int64_t *idx, int64_t K, int64_t row) {
    uint32_t acc = 0;
    int64_t bytes = 0;
    for (int64_t c = 0; c < K && bytes < WARM_BYTES; c++, bytes += row * (int64_t)sizeof(float)) {
        const u32a *w = (const u32a *)(wi + idx[c] * row);
        for (int64_t q = 0; q < row; q += 16) acc ^= w[q];
    }
    __asm__ volatile("" : : "r"(acc)); /* the loads are the point: keep them */
}

/* Whether convolve_local balances: (sample, head) tasks for every thread alike, or many. */
DGC_INTERNAL int local_balances(const Shape *s, int threads) {
    const int64_t n = s->B * s->heads;
    return threads <= 1 || (n >= threads && (n % threads == 0 || n >= 4 * threads));
}

/* pad_gather + convolve a (sample, head) at a time: each thread gathers that pair's K planes
 * into its own scratch and convolves them while they are in its cache, where the two passes
 * over all B*heads*K planes write, then read back, a buffer larger than the caches (e.g. 7.6
 * MB for a 56x56 ResNet-18 layer at batch 8). Returns 0, or -1 when a scratch buffer cannot be
 * allocated. */
DGC_INTERNAL int convolve_local(const float *x, const int64_t *index, const float *scale,
                          const float *bn_a, const float *bn_c, const float *rows, float *y,
                          const Shape *s, int threads) {
    const int64_t oh = s->O / s->heads, R = tile_rows(s->Wo), kk = s->k * s->k;
    const int64_t jb = block_size(oh), n = s->B * s->heads;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *planes = scratch_slot(1, sizeof(float) * s->K * s->plane);
        failed = planes == NULL;
        /* this thread's tasks: consecutive (sample, head) pairs, as schedule(static) gives */
        const int64_t lo = n * omp_thread() / omp_threads(), hi = n * (omp_thread() + 1) / omp_threads();
        for (int64_t bi = lo; bi < hi; bi++) {
            if (!planes) continue;
            const float *wi = rows + bi % s->heads * s->C * oh * kk;
            const int64_t *idx = index + bi * s->K;
            if (bi - lo < s->heads) warm_rows(wi, idx, s->K, oh * kk); /* a head's first task */
            for (int64_t c = 0; c < s->K; c++)
                gather_plane(x, index, scale, bn_a, bn_c, planes + c * s->plane, s,
                             bi * s->K + c);
            for (int64_t j0 = 0; j0 < oh; j0 += jb) {
                if (j0 + jb < oh) prefetch_block(wi, idx, s->K, oh * kk, j0 + jb, jb, kk);
                conv_block(planes, wi + j0 * kk, idx, y, s, bi / s->heads, bi % s->heads, j0,
                           jb, R);
            }
        }
    }
    return failed ? -1 : 0;
}

/* The kept-channel convolution alone, on an already normalised input, with the weight in row
 * layout. Returns 0, or -1 when the scratch buffer cannot be allocated. */
DGC_API int dgc_direct_conv(const float *x, int64_t B, int64_t C, int64_t H, int64_t W,
                    const int64_t *index, const float *scale, int64_t heads, int64_t K,
                    const float *rows, int64_t O, int64_t k, int64_t stride, int64_t pad,
                    float *y, int64_t Ho, int64_t Wo, int threads) {
    const Shape s = make_shape(B, C, H, W, heads, K, O, k, stride, pad, Ho, Wo);
    if (local_balances(&s, threads))
        return convolve_local(x, index, scale, NULL, NULL, rows, y, &s, threads);
    float *work = scratch(sizeof(float) * B * heads * K * s.plane);
    if (!work) return -1;
    pad_gather(x, index, scale, NULL, NULL, work, &s, threads);
    convolve(work, index, rows, y, &s, threads);
    return 0;
}

/* A static group convolution (groups = heads, each reading its own C/groups consecutive input
 * channels, outputs not interleaved: group i's O/groups outputs are consecutive) after an
 * optional eval BN-ReLU (bn_a NULL: none): the DGC kernel with every sample keeping the same
 * channels at scale 1. rows: the weight in row layout over all C channels (row i*C + c holds
 * group i's kernels of channel c; only the group's own rows are read). Why: oneDNN runs
 * CondenseNet's 3x3 group convs (8-32 channels a group, 2-8 outputs) at a few GMAC/s at batch
 * 1. x and y may be channel slices of wider tensors (a DenseNet stage's features): sample b's
 * channels start at x + b*xc*H*W and y + b*yc*Ho*Wo. Returns 0, or -1 when a scratch buffer
 * cannot be allocated. */
DGC_API int dgc_group_conv_eval(const float *x, int64_t B, int64_t C, int64_t H, int64_t W,
                        int64_t groups, const float *bn_a, const float *bn_c, const float *rows,
                        int64_t O, int64_t k, int64_t stride, int64_t pad, float *y, int64_t Ho,
                        int64_t Wo, int64_t xc, int64_t yc, int threads) {
    const int64_t K = C / groups, n = B * groups * K;
    Shape s = make_shape(B, C, H, W, groups, K, O, k, stride, pad, Ho, Wo);
    s.sj = 1;
    s.si = O / groups;
    s.xc = xc;
    s.yc = yc;
    const int local = local_balances(&s, threads);
    const int64_t planes = local ? 0 : n * s.plane;
    float *buf = scratch(sizeof(int64_t) * n + sizeof(float) * (n + planes));
    if (!buf) return -1;
    int64_t *index = (int64_t *)buf;
    float *scale = (float *)(index + n), *work = scale + n;
    for (int64_t t = 0; t < n; t++) {
        index[t] = t % (groups * K); /* group i's channels i*K .. i*K + K - 1 */
        scale[t] = 1.0f;
    }
    if (local) return convolve_local(x, index, scale, bn_a, bn_c, rows, y, &s, threads);
    pad_gather(x, index, scale, bn_a, bn_c, work, &s, threads);
    convolve(work, index, rows, y, &s, threads);
    return 0;
}
