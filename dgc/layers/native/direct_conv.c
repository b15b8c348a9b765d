/* Direct convolution over each sample's kept channels, for the DGC layer's inference path.
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
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

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
static void gather_plane(const float *x, const int64_t *index, const float *scale,
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

/* Every kept channel's work plane: work[t] for t < B*heads*K. */
static void pad_gather(const float *x, const int64_t *index, const float *scale,
                       const float *bn_a, const float *bn_c, float *work, const Shape *s,
                       int threads) {
    const int64_t n = s->B * s->heads * s->K;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < n; t++)
        gather_plane(x, index, scale, bn_a, bn_c, work + t * s->plane, s, t);
}

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

/* Output rows per tile: one vector a row on maps at most 8 wide, else two. */
static int64_t tile_rows(int64_t Wo) { return Wo <= 8 ? NARROW_ROWS : WIDE_ROWS; }

/* Grow-only scratch buffers per thread (work planes, selection), reused by every layer and
 * call and freed when the thread exits: large buffers allocated per call would be fresh pages,
 * page-faulted on every call. Slot 0 is the calling thread's; slot 1 the per-thread planes of
 * convolve_local, which the calling thread also runs while its slot 0 is in use. */
#define SCRATCH_SLOTS 2
typedef struct {
    void *buf[SCRATCH_SLOTS];
    size_t bytes[SCRATCH_SLOTS];
} Scratch;
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

static void scratch_free(void *p) {
    for (int i = 0; i < SCRATCH_SLOTS; i++) free(((Scratch *)p)->buf[i]);
    free(p);
}

static void scratch_init(void) { pthread_key_create(&scratch_key, scratch_free); }

/* At least `bytes` of this thread's scratch buffer `slot`, or NULL when memory runs out. */
static void *scratch_slot(int slot, size_t bytes) {
    pthread_once(&scratch_once, scratch_init);
    Scratch *s = pthread_getspecific(scratch_key);
    if (!s) {
        s = calloc(1, sizeof *s);
        if (!s || pthread_setspecific(scratch_key, s) != 0) {
            free(s);
            return NULL;
        }
    }
    if (bytes > s->bytes[slot]) {
        free(s->buf[slot]);
        s->bytes[slot] = bytes + bytes / 2;
        s->buf[slot] = malloc(s->bytes[slot]);
        if (!s->buf[slot]) s->bytes[slot] = 0;
    }
    return s->buf[slot];
}

static void *scratch(size_t bytes) { return scratch_slot(0, bytes); }

/* Output block j0..j0+jb of head i of sample b, from that (b, i)'s K work planes; wrows: head
 * i's rows at output j0 (row c of the block starts at wrows + c*oh*kk). */
static inline __attribute__((always_inline)) void conv_block(
    const float *planes, const float *wrows, const int64_t *idx, float *y, const Shape *s,
    int64_t b, int64_t i, int64_t j0, int64_t jb, int64_t R) {
    FOR_EACH_TILE(TILE_CASE)
}

/* Output channels per block: 4, 2 or 1, whichever divides O/h. */
static int64_t block_size(int64_t oh) { return oh % 4 == 0 ? 4 : (oh % 2 == 0 ? 2 : 1); }

/* The convolution of every (sample, head, output block) from the gathered work planes.
 * rows: the weight in row layout, (heads*C, O/h*k*k). */
static void convolve(const float *work, const int64_t *index, const float *rows, float *y,
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

/* The calling thread's number and its team's size (0 and 1 without OpenMP). */
static int64_t omp_thread(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static int64_t omp_threads(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/* Whether convolve_local balances: (sample, head) tasks for every thread alike, or many. */
static int local_balances(const Shape *s, int threads) {
    const int64_t n = s->B * s->heads;
    return threads <= 1 || (n >= threads && (n % threads == 0 || n >= 4 * threads));
}

/* pad_gather + convolve a (sample, head) at a time: each thread gathers that pair's K planes
 * into its own scratch and convolves them while they are in its cache, where the two passes
 * over all B*heads*K planes write, then read back, a buffer larger than the caches (e.g. 7.6
 * MB for a 56x56 ResNet-18 layer at batch 8). Returns 0, or -1 when a scratch buffer cannot be
 * allocated. */
static int convolve_local(const float *x, const int64_t *index, const float *scale,
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

/* Padded rows and columns per phase of one work plane: room for every tile's reads. */
static void geometry(int64_t H, int64_t W, int64_t k, int64_t stride, int64_t pad, int64_t Ho,
                     int64_t Wo, int64_t *Hp, int64_t *Wph) {
    const int64_t R = tile_rows(Wo), xs = Wo <= 8 ? 8 : 16;
    const int64_t ho_pad = (Ho + R - 1) / R * R, wo_pad = (Wo + xs - 1) / xs * xs;
    int64_t hp = H + 2 * pad, wp = W + 2 * pad;
    if ((ho_pad - 1) * stride + k > hp) hp = (ho_pad - 1) * stride + k;
    if ((wo_pad - 1) * stride + k > wp) wp = (wo_pad - 1) * stride + k;
    *Hp = hp;
    *Wph = (wp + stride - 1) / stride;
}

static Shape make_shape(int64_t B, int64_t C, int64_t H, int64_t W, int64_t heads, int64_t K,
                        int64_t O, int64_t k, int64_t stride, int64_t pad, int64_t Ho,
                        int64_t Wo) {
    Shape s = {B, C, H, W, heads, K, O, k, stride, pad, Ho, Wo, 0, 0, 0, heads, 1, C, O};
    geometry(H, W, k, stride, pad, Ho, Wo, &s.Hp, &s.Wph);
    s.plane = stride * s.Hp * s.Wph;
    return s;
}

/* The kept-channel convolution alone, on an already normalised input, with the weight in row
 * layout. Returns 0, or -1 when the scratch buffer cannot be allocated. */
int dgc_direct_conv(const float *x, int64_t B, int64_t C, int64_t H, int64_t W,
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
int dgc_group_conv_eval(const float *x, int64_t B, int64_t C, int64_t H, int64_t W,
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

/* Weight gradient, per (sample, head, kept channel): the O/h x k*k kernels' gradient
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
int dgc_wgrad_weight(const float *x, int64_t B, int64_t C, int64_t H, int64_t W,
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

/* The dot product of v[0..n) and z[0..n), in four vector accumulators (a plain float loop is
 * neither vectorised nor pipelined: the compiler may not reorder a float sum, so every add
 * waits for the one before it). */
static float dot(const float *v, const float *z, int64_t n) {
    v8 acc0 = {0}, acc1 = {0}, acc2 = {0}, acc3 = {0};
    int64_t q = 0;
    for (; q + 32 <= n; q += 32) {
        acc0 += *(const v8u *)(v + q) * *(const v8u *)(z + q);
        acc1 += *(const v8u *)(v + q + 8) * *(const v8u *)(z + q + 8);
        acc2 += *(const v8u *)(v + q + 16) * *(const v8u *)(z + q + 16);
        acc3 += *(const v8u *)(v + q + 24) * *(const v8u *)(z + q + 24);
    }
    for (; q + 8 <= n; q += 8) acc0 += *(const v8u *)(v + q) * *(const v8u *)(z + q);
    acc0 += acc1 + acc2 + acc3;
    float sum = 0.0f;
    for (int e = 0; e < 8; e++) sum += acc0[e];
    for (; q < n; q++) sum += v[q] * z[q];
    return sum;
}

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

/* Input gradient, per (sample, head, kept channel): the transposed convolution
 * gx[b,i,c] = sum over the O/h outputs j and taps t of W[i*O/h + j, idx[c], t] times the
 * output gradient shifted back by t: a direct convolution of the zero-padded gradient planes
 * of head i (work, padded by k-1-pad; dilated at stride > 1, gather_gradient) with the flipped
 * kernels, each kept channel reading its own weight row (row layout: head i's kernels of input
 * channel c are O/h x k*k contiguous floats). The tile keeps CB kept channels x R rows x 8*NV columns in
 * registers, as the forward's tile does. s describes the gradient planes: K = O/h planes per
 * (b, i), Ho x Wo = H x W the input's size. */
static inline __attribute__((always_inline)) void tile_igrad(
    const float *planes, const float *const *wr, float *gx, const Shape *s, int64_t oy,
    int64_t x0, const int CB, const int R, const int NV) {
    v8 acc[4][MAX_VEC];
    for (int cc = 0; cc < CB; cc++)
        for (int q = 0; q < R * NV; q++) acc[cc][q] = (v8){0};
    const int64_t kk = s->k * s->k;
    int64_t off[MAX_TAPS], voff[MAX_VEC];
    for (int64_t ky = 0; ky < s->k; ky++)
        for (int64_t kx = 0; kx < s->k; kx++) off[ky * s->k + kx] = (oy + ky) * s->Wph + x0 + kx;
    for (int q = 0; q < R * NV; q++) voff[q] = (q / NV) * s->Wph + (q % NV) * 8;
    for (int64_t j = 0; j < s->K; j++) {
        const float *plane = planes + j * s->plane;
        for (int64_t t = 0; t < kk; t++) {
            const float *in = plane + off[t];
            v8 xv[MAX_VEC];
            for (int q = 0; q < R * NV; q++) xv[q] = *(const v8u *)(in + voff[q]);
            for (int cc = 0; cc < CB; cc++) {
                const float w = wr[cc][j * kk + kk - 1 - t]; /* the flipped tap */
                for (int q = 0; q < R * NV; q++) acc[cc][q] += w * xv[q];
            }
        }
    }
    store_tiles(acc, gx, s->Ho, s->Wo, oy, x0, CB, R, NV);
}

#define IGRAD_CASE(CBV, RV, NVV)                                                              \
    if (cb == CBV && R == RV) {                                                               \
        for (int64_t oy = 0; oy < s->Ho; oy += RV)                                            \
            for (int64_t x0 = 0; x0 < s->Wo; x0 += 8 * NVV)                                   \
                tile_igrad(planes, wr, out, s, oy, x0, CBV, RV, NVV);                          \
        return;                                                                               \
    }

/* The gradient planes of cb kept channels (weight rows wr[0..cb)) into out (cb x Ho x Wo),
 * from one (sample, head)'s padded output-gradient planes. */
static void igrad_block(const float *planes, const float *const *wr, float *out, const Shape *s,
                        int64_t cb, int64_t R) {
    FOR_EACH_TILE(IGRAD_CASE)
}

/* The input-gradient kernels' Shape: the gradient planes as the input of a stride-1
 * convolution giving H x W, padded by k-1-pad; at stride st > 1 dilated (st-1 zeros between
 * their pixels, and the output padding's zeros after), i.e. H + 2*pad - k + 1 rows. */
static Shape igrad_shape(int64_t B, int64_t O, int64_t heads, int64_t K, int64_t k, int64_t pad,
                         int64_t H, int64_t W) {
    const int64_t Hd = H + 2 * pad - k + 1, Wd = W + 2 * pad - k + 1;
    return make_shape(B, O, Hd, Wd, heads, O / heads, K, k, 1, k - 1 - pad, H, W);
}

/* Gradient plane t (of B*heads*O/h: channel gindex[t] of gy, Ho x Wo) into dst as the
 * igrad_shape plane: at stride 1 gather_plane's copy; at stride st its pixels st apart, zeros
 * between. Why: the input gradient of a strided conv is the stride-1 convolution of the
 * dilated gradient with the flipped kernels, so the input-gradient tile serves strided layers
 * too (st*st times the multiply-adds, most of them on zeros, but oneDNN ran the batch-folded
 * grouped backward of DyResNet-20's strided 3x3 layers at about 5 GMAC/s). */
static void gather_gradient(const float *gy, const int64_t *gindex, const float *ones,
                            int64_t Ho, int64_t Wo, int64_t st, float *dst, const Shape *s,
                            int64_t t) {
    if (st == 1) {
        gather_plane(gy, gindex, ones, NULL, NULL, dst, s, t);
        return;
    }
    const float *src = gy + (t / (s->heads * s->K) * s->xc + gindex[t]) * Ho * Wo;
    memset(dst, 0, sizeof(float) * s->plane);
    for (int64_t oy = 0; oy < Ho; oy++) {
        float *row = dst + (s->pad + oy * st) * s->Wph + s->pad;
        for (int64_t ox = 0; ox < Wo; ox++) row[ox * st] = src[oy * Wo + ox];
    }
}

/* gy: (B, O, Ho, Wo) heads interleaved; index: (B, heads, K) kept channels; rows: the weight
 * in row layout (heads*C, O/h*k*k); gx: (B*heads*K, H, W), the gradient of each kept channel's
 * scaled input plane. k odd and at most 7, pad <= k - 1; stride: the layer's. gindex: (B,
 * heads, O/h) the channel j*heads + i of each gradient plane (the caller's arange). Returns 0,
 * or -1 when the scratch buffer cannot be allocated. */
int dgc_igrad_planes(const float *gy, int64_t B, int64_t O, int64_t Ho, int64_t Wo,
                     const int64_t *gindex, const float *ones, const int64_t *index,
                     int64_t heads, int64_t K, const float *rows, int64_t C, int64_t k,
                     int64_t pad, int64_t stride, float *gx, int64_t H, int64_t W,
                     int threads) {
    const int64_t oh = O / heads, kk = k * k, n_planes = B * heads * oh;
    const Shape s = igrad_shape(B, O, heads, K, k, pad, H, W);
    float *work = scratch(sizeof(float) * n_planes * s.plane);
    if (!work) return -1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < n_planes; t++)
        gather_gradient(gy, gindex, ones, Ho, Wo, stride, work + t * s.plane, &s, t);
    const int64_t R = tile_rows(W), cb = block_size(K), blocks = K / cb;
    const int64_t n = B * heads * blocks;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < n; t++) {
        const int64_t c0 = t % blocks * cb, bi = t / blocks, i = bi % heads;
        const float *planes = work + bi * oh * s.plane;
        const float *wr[4];
        for (int64_t cc = 0; cc < cb; cc++) wr[cc] = rows + (i * C + index[bi * K + c0 + cc]) * oh * kk;
        igrad_block(planes, wr, gx + (bi * K + c0) * H * W, &s, cb, R);
    }
    return 0;
}

/* A strided layer's input gradient by phases. Input pixel (st*r + py, st*q + px) takes
 * tap (ky, kx) of output (r + dy, q + dx) exactly where ky = py + pad (mod st), dy = (py + pad
 * - ky) / st, and likewise for columns: so each of the st*st phases of the input gradient is a
 * stride-1 correlation of the (undilated) output-gradient planes with its own taps, about
 * k*k/(st*st) of them. Why: the dilated gradient (gather_gradient) costs st*st times the
 * multiply-adds, three quarters of them on zeros at stride 2. The gradient planes carry a
 * zero margin of M on every side (rows of pitch Wg, glen floats a plane). */
typedef struct {
    int64_t st, M, Wg, glen, hr, wr; /* hr, wr: the phase planes' rows and columns, rounded up */
} Phases;

static Phases phases_of(int64_t k, int64_t st, int64_t H, int64_t W, int64_t R, int64_t NV) {
    Phases p;
    p.st = st;
    p.M = (k - 1 + st - 1) / st + 1;
    const int64_t hmax = (H + st - 1) / st, wmax = (W + st - 1) / st;
    p.hr = (hmax + R - 1) / R * R;
    p.wr = (wmax + 8 * NV - 1) / (8 * NV) * (8 * NV);
    p.Wg = p.wr + 2 * p.M;
    p.glen = (p.hr + 2 * p.M) * p.Wg + 8;
    return p;
}

/* Output-gradient plane t (of B*heads*O/h: channel gindex[t] of gy) into dst with the margin. */
static void margin_gradient(const float *gy, const int64_t *gindex, int64_t per_sample,
                            int64_t O, int64_t Ho, int64_t Wo, const Phases *p, float *dst,
                            int64_t t) {
    const float *src = gy + (t / per_sample * O + gindex[t]) * Ho * Wo;
    memset(dst, 0, sizeof(float) * p->glen);
    for (int64_t r = 0; r < Ho; r++)
        memcpy(dst + (r + p->M) * p->Wg + p->M, src + r * Wo, sizeof(float) * Wo);
}

static inline __attribute__((always_inline)) void tile_phase(
    const float *planes, const float *const *wr, float *out, const Phases *p, int64_t oh,
    int64_t kk, const int64_t *toff, const int64_t *widx, int64_t taps, int64_t hout,
    int64_t wout, int64_t oy, int64_t x0, const int CB, const int R, const int NV) {
    v8 acc[4][MAX_VEC];
    for (int cc = 0; cc < CB; cc++)
        for (int q = 0; q < R * NV; q++) acc[cc][q] = (v8){0};
    int64_t voff[MAX_VEC];
    for (int q = 0; q < R * NV; q++) voff[q] = (q / NV) * p->Wg + (q % NV) * 8;
    const int64_t base = (oy + p->M) * p->Wg + x0 + p->M;
    for (int64_t j = 0; j < oh; j++) {
        const float *plane = planes + j * p->glen + base;
        for (int64_t t = 0; t < taps; t++) {
            const float *in = plane + toff[t];
            v8 xv[MAX_VEC];
            for (int q = 0; q < R * NV; q++) xv[q] = *(const v8u *)(in + voff[q]);
            for (int cc = 0; cc < CB; cc++) {
                const float w = wr[cc][j * kk + widx[t]];
                for (int q = 0; q < R * NV; q++) acc[cc][q] += w * xv[q];
            }
        }
    }
    store_tiles(acc, out, hout, wout, oy, x0, CB, R, NV);
}

#define PHASE_CASE(CBV, RV, NVV)                                                              \
    if (cb == CBV && R == RV) {                                                               \
        for (int64_t oy = 0; oy < hout; oy += RV)                                             \
            for (int64_t x0 = 0; x0 < wout; x0 += 8 * NVV)                                    \
                tile_phase(planes, wr, ph, p, oh, kk, toff, widx, taps, hout, wout, oy, x0,   \
                           CBV, RV, NVV);                                                     \
    } else

/* The input-gradient planes of cb kept channels (weight rows wr) into g (cb x H x W), phase by
 * phase through ph (cb phase planes), from one (sample, head)'s margined gradient planes. */
static void igrad_phases(const float *planes, const float *const *wr, float *g, float *ph,
                         const Phases *p, int64_t oh, int64_t k, int64_t pad, int64_t H,
                         int64_t W, int64_t cb, int64_t R) {
    const int64_t st = p->st, kk = k * k;
    for (int64_t py = 0; py < st; py++)
        for (int64_t px = 0; px < st; px++) {
            const int64_t hout = (H - py + st - 1) / st, wout = (W - px + st - 1) / st;
            if (hout <= 0 || wout <= 0) continue;
            int64_t toff[MAX_TAPS], widx[MAX_TAPS], taps = 0;
            for (int64_t ky = 0; ky < k; ky++) {
                if (((py + pad - ky) % st + st) % st) continue;
                for (int64_t kx = 0; kx < k; kx++) {
                    if (((px + pad - kx) % st + st) % st) continue;
                    toff[taps] = (py + pad - ky) / st * p->Wg + (px + pad - kx) / st;
                    widx[taps++] = ky * k + kx;
                }
            }
            FOR_EACH_TILE(PHASE_CASE) {}
            for (int64_t cc = 0; cc < cb; cc++) /* the phase into its pixels of g */
                for (int64_t r = 0; r < hout; r++) {
                    const float *src = ph + cc * hout * wout + r * wout;
                    float *dst = g + cc * H * W + (st * r + py) * W + px;
                    for (int64_t q = 0; q < wout; q++) dst[st * q] = src[q];
                }
        }
}
#undef PHASE_CASE

/* The input and saliency gradients of a layer in one pass, a sample per task: each
 * kept channel's gradient plane g (as dgc_igrad_planes) goes straight into
 *   grad_x[b, idx[b,i,c]] += scale[b,i,c] * g   and   grad_scale[b,i,c] = <g, x[b, idx[b,i,c]]>,
 * x the layer's unscaled (post-BN-ReLU) input; grad_x is overwritten. Why: done with torch ops,
 * these are a gather of the kept input planes, two products, a zero fill, an index_add and a
 * sum, each a pass over a (B*heads*K, H*W) tensor. One thread owns a sample, so the
 * accumulation into grad_x needs no atomics. Returns 0, or -1 without scratch memory. */
int dgc_igrad_fused(const float *gy, int64_t B, int64_t O, int64_t Ho, int64_t Wo,
                    const int64_t *gindex, const float *ones, const int64_t *index,
                    const float *scale, int64_t heads, int64_t K, const float *rows, int64_t C,
                    int64_t k, int64_t pad, int64_t stride, const float *x, int64_t H,
                    int64_t W, float *grad_x, float *grad_scale, int threads) {
    const int64_t oh = O / heads, kk = k * k, hw = H * W;
    const Shape s = igrad_shape(B, O, heads, K, k, pad, H, W);
    const int64_t cb = block_size(K);
    /* strided: by phases (igrad_phases), each phase's tile shape by its width */
    const int64_t R = tile_rows(stride > 1 ? (W + stride - 1) / stride : W);
    const Phases p = phases_of(k, stride, H, W, R, R == NARROW_ROWS ? 1 : 2);
    const int64_t plane = stride > 1 ? p.glen : s.plane;
    const int64_t phase = stride > 1 ? cb * p.hr * p.wr : 0; /* cb phase planes */
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *planes = scratch_slot(1, sizeof(float) * (heads * oh * plane + 4 * hw + phase));
        failed = planes == NULL;
        float *g = planes ? planes + heads * oh * plane : NULL; /* cb gradient planes */
        float *ph = g ? g + 4 * hw : NULL;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) {
            if (!planes) continue;
            float *gxb = grad_x + b * C * hw;
            memset(gxb, 0, sizeof(float) * C * hw);
            for (int64_t t = 0; t < heads * oh; t++) {
                if (stride > 1)
                    margin_gradient(gy, gindex, heads * oh, O, Ho, Wo, &p, planes + t * plane,
                                    b * heads * oh + t);
                else
                    gather_gradient(gy, gindex, ones, Ho, Wo, stride, planes + t * plane, &s,
                                    b * heads * oh + t);
            }
            for (int64_t i = 0; i < heads; i++) {
                const int64_t *idx = index + (b * heads + i) * K;
                for (int64_t c0 = 0; c0 < K; c0 += cb) {
                    const float *wr[4];
                    for (int64_t cc = 0; cc < cb; cc++) wr[cc] = rows + (i * C + idx[c0 + cc]) * oh * kk;
                    if (stride > 1)
                        igrad_phases(planes + i * oh * plane, wr, g, ph, &p, oh, k, pad, H, W, cb, R);
                    else
                        igrad_block(planes + i * oh * plane, wr, g, &s, cb, R);
                    for (int64_t cc = 0; cc < cb; cc++) {
                        const int64_t at = (b * heads + i) * K + c0 + cc, ch = idx[c0 + cc];
                        const float *gc = g + cc * hw, a = scale[at];
                        grad_scale[at] = dot(gc, x + (b * C + ch) * hw, hw);
                        float *dst = gxb + ch * hw;
                        for (int64_t q = 0; q < hw; q++) dst[q] += a * gc[q];
                    }
                }
            }
        }
    }
    return failed ? -1 : 0;
}

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
 * threshold go, as in methods.md 1.1). Slots left by ties get a channel with scale 0. With
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
int dgc_select(const float *sal, int64_t rows, int64_t C, int64_t n, int64_t *index,
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

/* Everything a DGC layer's fused inference forward needs except its input and output, built
 * once per (layer, input shape) by the caller. bn_a is NULL for a layer without BN-ReLU;
 * fc2t is fc2 as (heads, r, C); weight is in row layout (gathered.weight_rows). */
typedef struct {
    const float *bn_a, *bn_c, *fc1, *fc2t, *b2, *weight;
    const float *ep_a, *ep_c; /* Shape's epilogue: per-output (scale, shift), or NULL */
    int64_t B, C, H, W, r, heads, n, O, k, stride, pad, Ho, Wo;
    int64_t xc; /* channels a sample spans in x: C, or more where x is a channel slice */
    int32_t mask, threads, ep_relu;
} FusedPlan;

/* The whole inference forward of a DGC layer: BN-ReLU, channel means, saliency generators,
 * bottom-n deactivation, then the kept-channel convolution into y (B, O, Ho, Wo), through the
 * plan's epilogue (Shape's; res: the residual, laid out as y, or NULL). */
int dgc_fused_eval(const FusedPlan *p, const float *x, const float *res, float *y) {
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
int dgc_bn_relu_train(const float *x, int64_t B, int64_t C, int64_t HW, const float *w,
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
int dgc_bn_relu_train_backward(const float *gy, const float *gz, const float *x, int64_t B,
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

/* nn.AvgPool2d(2, 2) in eval: planes (P, H, W) into (P, H/2, W/2) (floor), both contiguous,
 * each output summed as torch's CPU kernel sums it ((x00 + x01) + x10) + x11, then / 4, so
 * the outputs are torch's to the bit. Why: torch's NCHW CPU pool ran a DenseNet-86 transition
 * at (64, 128, 32, 32) in 8 ms on two threads (about 4 GB/s); channels-last is fast but the
 * copies there and back cost more than it saves. */
void dgc_avg_pool2(const float *x, float *y, int64_t planes, int64_t H, int64_t W, int threads) {
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
