/* igrad.c: the input gradient of the kept-channel convolution (dgc_direct_conv), per kept
 * plane (dgc_igrad_planes) or summed into the input's planes with the saliencies' gradient
 * (dgc_igrad_fused); a strided layer's by phases. */
#include <stdint.h>
#include <string.h>

#include "common.h"
#include "tile.h"

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
DGC_API int dgc_igrad_planes(const float *gy, int64_t B, int64_t O, int64_t Ho, int64_t Wo,
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
DGC_API int dgc_igrad_fused(const float *gy, int64_t B, int64_t O, int64_t Ho, int64_t Wo,
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
