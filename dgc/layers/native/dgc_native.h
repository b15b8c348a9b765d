/* dgc_native.h: the ABI of the native kernels (libdgc_native), the one place that declares it.
 *
 * The Python loader (dgc/layers/native/build.py) reads this header: the ctypes signatures of
 * the functions below and the layout of FusedPlan are derived from it, and on load the
 * library's dgc_abi_version() and dgc_sizeof_fused_plan() must equal DGC_ABI_VERSION and the
 * size ctypes computes, or the library is rebuilt (else the torch kernels run). Keep every
 * declaration on the forms the loader parses: `DGC_API <type> <name>(<params>);` with types
 * from int, int32_t, int64_t, float, size_t, void and pointers, and FusedPlan's fields one
 * type per line. Raise DGC_ABI_VERSION on any change of a signature or of FusedPlan.
 *
 * Conventions: tensors are float32 (indices int64), contiguous unless a parameter says
 * otherwise; `threads` is the OpenMP team size (torch's intra-op thread count). Functions that
 * return int return 0, or -1 when a scratch buffer cannot be allocated.
 */
#ifndef DGC_NATIVE_H
#define DGC_NATIVE_H

#include <stddef.h>
#include <stdint.h>

#define DGC_ABI_VERSION 1
#define DGC_API __attribute__((visibility("default")))

/* Everything a DGC layer's fused eval forward needs except its input and output, built once
 * per (layer, input shape) by the caller. bn_a is NULL for a layer without BN-ReLU; fc2t is
 * fc2 as (heads, r, C); weight is in row layout (gathered.weight_rows). */
typedef struct {
    const float *bn_a;
    const float *bn_c;
    const float *fc1;
    const float *fc2t;
    const float *b2;
    const float *weight;
    const float *ep_a; /* the epilogue: per-output (scale, shift), or NULL (fused_eval.c) */
    const float *ep_c;
    int64_t B;
    int64_t C;
    int64_t H;
    int64_t W;
    int64_t r;
    int64_t heads;
    int64_t n;
    int64_t O;
    int64_t k;
    int64_t stride;
    int64_t pad;
    int64_t Ho;
    int64_t Wo;
    int64_t xc; /* channels a sample spans in x: C, or more where x is a channel slice */
    int32_t mask;
    int32_t threads;
    int32_t ep_relu;
} FusedPlan;

/* The version of this ABI the library was built with, and sizeof(FusedPlan) there. */
DGC_API int64_t dgc_abi_version(void);
DGC_API int64_t dgc_sizeof_fused_plan(void);

/* forward.c: the kept-channel convolution, and a static group convolution. */
DGC_API int dgc_direct_conv(const float *x, int64_t B, int64_t C, int64_t H, int64_t W,
                            const int64_t *index, const float *scale, int64_t heads, int64_t K,
                            const float *rows, int64_t O, int64_t k, int64_t stride,
                            int64_t pad, float *y, int64_t Ho, int64_t Wo, int threads);
DGC_API int dgc_group_conv_eval(const float *x, int64_t B, int64_t C, int64_t H, int64_t W,
                                int64_t groups, const float *bn_a, const float *bn_c,
                                const float *rows, int64_t O, int64_t k, int64_t stride,
                                int64_t pad, float *y, int64_t Ho, int64_t Wo, int64_t xc,
                                int64_t yc, int threads);

/* wgrad.c: the weight gradient of dgc_direct_conv, in the weight's row layout. */
DGC_API int dgc_wgrad_weight(const float *x, int64_t B, int64_t C, int64_t H, int64_t W,
                             const int64_t *index, const float *scale, int64_t heads, int64_t K,
                             const float *gy, int64_t O, int64_t k, int64_t stride, int64_t pad,
                             int64_t Ho, int64_t Wo, float *grad_rows, int threads);

/* igrad.c: the input gradient of dgc_direct_conv, per kept plane or summed into x's. */
DGC_API int dgc_igrad_planes(const float *gy, int64_t B, int64_t O, int64_t Ho, int64_t Wo,
                             const int64_t *gindex, const float *ones, const int64_t *index,
                             int64_t heads, int64_t K, const float *rows, int64_t C, int64_t k,
                             int64_t pad, int64_t stride, float *gx, int64_t H, int64_t W,
                             int threads);
DGC_API int dgc_igrad_fused(const float *gy, int64_t B, int64_t O, int64_t Ho, int64_t Wo,
                            const int64_t *gindex, const float *ones, const int64_t *index,
                            const float *scale, int64_t heads, int64_t K, const float *rows,
                            int64_t C, int64_t k, int64_t pad, int64_t stride, const float *x,
                            int64_t H, int64_t W, float *grad_x, float *grad_scale,
                            int threads);

/* fused_eval.c: the kept-channel selection, and a DGC layer's whole eval forward. */
DGC_API int dgc_select(const float *sal, int64_t rows, int64_t C, int64_t n, int64_t *index,
                       float *alive, int threads);
DGC_API int dgc_fused_eval(const FusedPlan *p, const float *x, const float *res, float *y);

/* bn.c: training BatchNorm + ReLU with the gate's pooling, and its backward. */
DGC_API int dgc_bn_relu_train(const float *x, int64_t B, int64_t C, int64_t HW, const float *w,
                              const float *bias, float eps, float *y, float *zsum, float *mean,
                              float *var, int threads);
DGC_API int dgc_bn_relu_train_backward(const float *gy, const float *gz, const float *x,
                                       int64_t B, int64_t C, int64_t HW, const float *mean,
                                       const float *invstd, const float *w, const float *bias,
                                       float *gx, float *gw, float *gb, int threads);

/* pool.c: nn.AvgPool2d(2, 2) in eval, bit for bit. */
DGC_API void dgc_avg_pool2(const float *x, float *y, int64_t planes, int64_t H, int64_t W,
                           int threads);

#endif
