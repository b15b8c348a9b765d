/* common.c: per-thread scratch buffers, the geometry of the work planes, a dot product, and
 * the ABI's self-description (dgc_native.h). */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

DGC_API int64_t dgc_abi_version(void) { return DGC_ABI_VERSION; }
DGC_API int64_t dgc_sizeof_fused_plan(void) { return (int64_t)sizeof(FusedPlan); }

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
DGC_INTERNAL void *scratch_slot(int slot, size_t bytes) {
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

DGC_INTERNAL void *scratch(size_t bytes) { return scratch_slot(0, bytes); }

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

DGC_INTERNAL Shape make_shape(int64_t B, int64_t C, int64_t H, int64_t W, int64_t heads, int64_t K,
                        int64_t O, int64_t k, int64_t stride, int64_t pad, int64_t Ho,
                        int64_t Wo) {
    Shape s = {.B = B, .C = C, .H = H, .W = W, .heads = heads, .K = K, .O = O, .k = k,
               .stride = stride, .pad = pad, .Ho = Ho, .Wo = Wo, .sj = heads, .si = 1,
               .xc = C, .yc = O};
    geometry(H, W, k, stride, pad, Ho, Wo, &s.Hp, &s.Wph);
    s.plane = stride * s.Hp * s.Wph;
    return s;
}

/* The dot product of v[0..n) and z[0..n), in four vector accumulators (a plain float loop is
 * neither vectorised nor pipelined: the compiler may not reorder a float sum, so every add
 * waits for the one before it). */
DGC_INTERNAL float dot(const float *v, const float *z, int64_t n) {
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
