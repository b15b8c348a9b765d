/* common.h: what the kernel sources share inside the library (nothing here is exported;
 * dgc_native.h is the ABI). GCC vector extensions: v8 is eight floats (one AVX register). */
#ifndef DGC_COMMON_H
#define DGC_COMMON_H

#include <stddef.h>
#include <stdint.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "dgc_native.h"

/* Functions one source defines for the others: not visible outside the library. */
#define DGC_INTERNAL __attribute__((visibility("hidden")))

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4))); /* unaligned loads */
typedef int32_t v8i __attribute__((vector_size(32)));

/* ReLU that keeps a NaN, as torch's does: zero where v < 0. */
static inline v8 relu8(v8 v) { return (v8)((v8i)v & ~(v < (v8){0})); }

#if defined(__clang__) /* clang has no __builtin_shuffle; GCC has __builtin_shufflevector from 12 */
#define SHUFFLE8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE8(a, b, ...) __builtin_shuffle(a, b, (v8i){__VA_ARGS__})
#endif

typedef struct {
    int64_t B, C, H, W, heads, K, O, k, stride, pad, Ho, Wo;
    int64_t Hp, Wph, plane; /* rows, columns per phase, floats per (b, i, c) work plane */
    int64_t sj, si; /* output j of head i is channel j*sj + i*si: (heads, 1) interleaved */
    int64_t xc, yc; /* channels a sample spans in x and y (C and O unless slices of wider) */
    /* The epilogue of every output value v of channel o (NULL, 0: none):
     * v = ReLU(ea[o] * v + ec[o] + res) with res the value at y's place in `res` (laid out as
     * y) where res is given, ReLU where relu. A ResNet block's BN (+ shortcut) (+ ReLU) after
     * its DGC conv, applied while the tile is in registers. */
    const float *ea, *ec, *res;
    int relu;
} Shape;

#define MAX_TAPS 49 /* kernels up to 7x7 */
/* Tile shapes: with 32 vector registers (AVX-512VL) 16 accumulators fit, else 12. */
#if defined(__AVX512VL__)
#define NARROW_ROWS 4 /* maps at most 8 wide: 4 rows of one vector */
#define WIDE_ROWS 2   /* wider maps: 2 rows of two vectors */
#else
#define NARROW_ROWS 3
#define WIDE_ROWS 1
#endif
#define MAX_VEC 4

/* Output rows per tile: one vector a row on maps at most 8 wide, else two. */
static inline int64_t tile_rows(int64_t Wo) { return Wo <= 8 ? NARROW_ROWS : WIDE_ROWS; }

/* Output channels per block: 4, 2 or 1, whichever divides O/h. */
static inline int64_t block_size(int64_t oh) { return oh % 4 == 0 ? 4 : (oh % 2 == 0 ? 2 : 1); }

/* The calling thread's number and its team's size (0 and 1 without OpenMP). */
static inline int64_t omp_thread(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static inline int64_t omp_threads(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/* common.c: per-thread scratch, the work planes' geometry, a dot product. */
/* At least `bytes` of this thread's scratch buffer `slot` (0 or 1), or NULL when memory runs
 * out; scratch(bytes) is slot 0. */
DGC_INTERNAL void *scratch_slot(int slot, size_t bytes);
DGC_INTERNAL void *scratch(size_t bytes);
/* The Shape of a kept-channel convolution, its work planes laid out for the tiles. */
DGC_INTERNAL Shape make_shape(int64_t B, int64_t C, int64_t H, int64_t W, int64_t heads,
                              int64_t K, int64_t O, int64_t k, int64_t stride, int64_t pad,
                              int64_t Ho, int64_t Wo);
/* The dot product of v[0..n) and z[0..n). */
DGC_INTERNAL float dot(const float *v, const float *z, int64_t n);

/* gather.c: kept channel t's scaled (and normalised: bn_a, bn_c) zero-padded work plane. */
DGC_INTERNAL void gather_plane(const float *x, const int64_t *index, const float *scale,
                               const float *bn_a, const float *bn_c, float *dst, const Shape *s,
                               int64_t t);

/* forward.c: the forward's passes, which the fused eval forward runs too. */
DGC_INTERNAL void pad_gather(const float *x, const int64_t *index, const float *scale,
                             const float *bn_a, const float *bn_c, float *work, const Shape *s,
                             int threads);
DGC_INTERNAL void convolve(const float *work, const int64_t *index, const float *rows, float *y,
                           const Shape *s, int threads);
DGC_INTERNAL int local_balances(const Shape *s, int threads);
DGC_INTERNAL int convolve_local(const float *x, const int64_t *index, const float *scale,
                                const float *bn_a, const float *bn_c, const float *rows,
                                float *y, const Shape *s, int threads);

#endif
