/*
 * A C firmware image for the Cortex-M4 (qemu mps2-an386) that links
 * libbatchnorm_c.a built for thumbv7em-none-eabihf and runs a training and
 * inference round through the C header:
 *
 *   - a Keras-configured NHWC layer and a PyTorch-configured NCHW layer,
 *     each trained for three steps (bn_layer_train, then
 *     bn_layer_train_in_place) and run in inference (bn_layer_infer);
 *   - bn_moments, bn_fold and bn_affine on the last batch;
 *   - one bad call (a wrong count): BN_ERR_LENGTH and nothing written.
 *
 * Every result is checked against f64 oracles (two-pass moments, fold,
 * normalization, moving update) within the DESIGN section 3 bounds that
 * tests/golden.rs and capi/tests/test.c use. The stack of each call is
 * measured by painting it first. PASS or FAIL goes out through
 * semihosting, and qemu exits 0 or 1.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "batchnorm.h"
#include "firmware.h"

#define N 4
#define S 16
#define C 8
#define LEN (N * S * C)
#define STEPS 3

static const double EPS = FLT_EPSILON;
static const double U = FLT_EPSILON / 2;

static int failures;
static uint32_t checks;

static void fail(const char *what, uint32_t i) {
    failures++;
    if (failures <= 10) {
        fw_puts("FAIL: ");
        fw_puts(what);
        fw_puts(" [");
        fw_put_u32(i);
        fw_puts("]\n");
    }
}

static void within(const char *what, uint32_t i, double got, double want, double bound) {
    checks++;
    if (!(fabs(got - want) <= bound)) fail(what, i);
}

static void ok(bn_status st, const char *what) {
    checks++;
    if (st != BN_OK) {
        fw_puts(bn_status_name(st));
        fw_puts(": ");
        fail(what, 0);
    }
}

/* ---- stack measurement ------------------------------------------------- */

struct stack_use {
    const char *name;
    uint32_t max;
};
static struct stack_use stack_uses[8];

/* Records the stack a call used below `sp0` under `name`. */
static void record(const char *name, uintptr_t sp0) {
    uint32_t used = fw_stack_used_below(sp0);
    checks++;
    if (used >= sp0 - fw_stack_limit()) fail("stack exhausted (raise STACK_SIZE in link.ld)", used);
    for (unsigned i = 0; i < sizeof stack_uses / sizeof stack_uses[0]; i++) {
        if (stack_uses[i].name == 0 || stack_uses[i].name == name) {
            stack_uses[i].name = name;
            if (used > stack_uses[i].max) stack_uses[i].max = used;
            return;
        }
    }
}

/* Paints, runs `call` (an expression), records its stack under `name`. */
#define MEASURED(name, call)                                                                       \
    ({                                                                                             \
        fw_stack_paint();                                                                          \
        uintptr_t sp0_ = fw_sp();                                                                  \
        bn_status st_ = (call);                                                                    \
        record(name, sp0_);                                                                        \
        st_;                                                                                       \
    })

/* ---- data and oracles -------------------------------------------------- */

static uint32_t rng = 0x2545F491u;

static float uniform(void) { /* xorshift32, in [-1, 1) */
    rng ^= rng << 13;
    rng ^= rng >> 17;
    rng ^= rng << 5;
    return (float)(int32_t)rng * (1.0f / 2147483648.0f);
}

static size_t index_of(bn_shape sh, size_t n, size_t s, size_t c) {
    if (sh.layout == BN_LAYOUT_NHWC) return (n * sh.spatial + s) * sh.channels + c;
    return (n * sh.channels + c) * sh.spatial + s;
}

static size_t channel_of(bn_shape sh, size_t i) {
    return sh.layout == BN_LAYOUT_NHWC ? i % sh.channels : (i / sh.spatial) % sh.channels;
}

/* Channel c: mean about c - 3 (+ step / 2), spread 0.5 + c / 4. */
static void make_batch(float *x, bn_shape sh, int step) {
    for (size_t n = 0; n < sh.batch; n++)
        for (size_t s = 0; s < sh.spatial; s++)
            for (size_t c = 0; c < sh.channels; c++)
                x[index_of(sh, n, s, c)] = ((float)c - 3.0f + 0.5f * (float)step) + (0.5f + 0.25f * (float)c) * uniform();
}

static void channel_moments(const float *x, bn_shape sh, size_t c, double *mean, double *var) {
    double sum = 0, ss = 0, count = (double)(sh.batch * sh.spatial);
    for (size_t n = 0; n < sh.batch; n++)
        for (size_t s = 0; s < sh.spatial; s++) sum += x[index_of(sh, n, s, c)];
    double m = sum / count;
    for (size_t n = 0; n < sh.batch; n++)
        for (size_t s = 0; s < sh.spatial; s++) {
            double d = x[index_of(sh, n, s, c)] - m;
            ss += d * d;
        }
    *mean = m;
    *var = ss / count;
}

static double half_ulp(double r) { return fabs((double)(float)r - r); }
static double mean_tol(double m, double v) { return 1e-6 * (fabs(m) + sqrt(v)) + half_ulp(m); }
static double var_tol(double m, double v) { return (fabs(m) <= 10.0 * sqrt(v) ? 1e-5 : 1e-3) * v + half_ulp(v); }

/* y against the f64 normalization with (mean, var), section 3 bound. */
static void check_y(const char *what, const float *x, const float *y, bn_shape sh, const float *mean,
                    const float *var, const float *scale, const float *offset, float eps) {
    for (size_t i = 0; i < sh.batch * sh.spatial * sh.channels; i++) {
        size_t c = channel_of(sh, i);
        double a = (double)scale[c] / sqrt((double)var[c] + (double)eps);
        double want = (double)x[i] * a + ((double)offset[c] - (double)mean[c] * a);
        double bound = 4.0 * EPS * (fabs(x[i] * a) + fabs(mean[c] * a) + fabs(offset[c])) + half_ulp(want);
        within(what, (uint32_t)i, y[i], want, bound);
    }
}

/* ---- the round ---------------------------------------------------------- */

static float x[LEN], y[LEN], x_copy[LEN];
static float scale[C], offset[C], mm[C], mv[C], bm[C], bv[C], prev_mm[C], prev_mv[C], a[C], b[C];

static void layer_round(const char *name, bn_config cfg, bn_shape sh) {
    fw_puts(name);
    fw_puts("\n");
    for (size_t c = 0; c < C; c++) {
        scale[c] = 1.0f + 0.125f * (float)c;
        offset[c] = 0.25f * (float)c - 1.0f;
        mm[c] = 0.0f;
        mv[c] = 1.0f;
    }
    bn_layer layer;
    ok(bn_layer_init(&layer, cfg, C, mm, mv, bm, bv), "bn_layer_init");
    uint64_t count = sh.batch * sh.spatial;
    for (int step = 0; step < STEPS; step++) {
        make_batch(x, sh, step);
        memcpy(prev_mm, mm, sizeof mm);
        memcpy(prev_mv, mv, sizeof mv);
        if (step < 2) {
            ok(MEASURED("bn_layer_train", bn_layer_train(&layer, x, LEN, y, LEN, sh, scale, offset)), "train");
        } else {
            memcpy(y, x, sizeof y);
            ok(MEASURED("bn_layer_train_in_place", bn_layer_train_in_place(&layer, y, LEN, sh, scale, offset)),
               "train_in_place");
        }
        checks++;
        if (layer.batches != (uint64_t)step + 1) fail("batches", (uint32_t)step);
        /* batch statistics, the output, the moving update */
        for (size_t c = 0; c < C; c++) {
            double m, v;
            channel_moments(x, sh, c, &m, &v);
            within("batch mean", (uint32_t)c, bm[c], m, mean_tol(m, v));
            within("batch variance", (uint32_t)c, bv[c], v, var_tol(m, v));
        }
        check_y("y_train", x, y, sh, bm, bv, scale, offset, cfg.epsilon);
        double d = cfg.decay, w = (float)(1.0f - cfg.decay), d_ref = cfg.decay, w_ref = 1.0 - (double)cfg.decay;
        double bessel = cfg.moving_variance == BN_VARIANCE_SAMPLE ? (double)count / (double)(count - 1) : 1.0;
        double rounds = bessel == 1.0 ? 2.0 : 3.0;
        for (size_t c = 0; c < C; c++) {
            double pm = fabs(prev_mm[c]), pv = fabs(prev_mv[c]);
            double rm = prev_mm[c] * d_ref + bm[c] * w_ref, rv = prev_mv[c] * d_ref + bv[c] * bessel * w_ref;
            double em = fabs(d - d_ref), ew = fabs(w - w_ref);
            within("moving mean", (uint32_t)c, mm[c], rm,
                   (rounds * U + U * U) * (pm * d + fabs(bm[c]) * w) + pm * em + fabs(bm[c]) * ew);
            within("moving variance", (uint32_t)c, mv[c], rv,
                   (rounds * U + U * U) * (pv * d + bv[c] * bessel * w) + pv * em + bv[c] * bessel * ew);
        }
    }
    /* inference with the moving statistics */
    make_batch(x, sh, 1);
    ok(MEASURED("bn_layer_infer", bn_layer_infer(&layer, x, LEN, y, LEN, sh, scale, offset)), "infer");
    check_y("y_infer", x, y, sh, mm, mv, scale, offset, cfg.epsilon);

    /* statistics, fold and affine on the same batch */
    float mean[C], var[C];
    ok(MEASURED("bn_moments", bn_moments(x, LEN, sh, mean, var, C)), "moments");
    for (size_t c = 0; c < C; c++) {
        double m, v;
        channel_moments(x, sh, c, &m, &v);
        within("moments mean", (uint32_t)c, mean[c], m, mean_tol(m, v));
        within("moments variance", (uint32_t)c, var[c], v, var_tol(m, v));
    }
    ok(MEASURED("bn_fold", bn_fold(mm, mv, scale, offset, C, cfg.epsilon, a, b)), "fold");
    bn_activation none = {BN_ACTIVATION_NONE, 0, 0};
    ok(MEASURED("bn_affine", bn_affine(x, LEN, y, LEN, sh, a, b, C, none)), "affine");
    check_y("fold+affine", x, y, sh, mm, mv, scale, offset, cfg.epsilon);

    /* a wrong count: refused, nothing written, state unchanged */
    memcpy(x_copy, y, sizeof y);
    uint64_t batches = layer.batches;
    bn_status st = bn_layer_train(&layer, x, LEN - 1, y, LEN, sh, scale, offset);
    checks++;
    if (st != BN_ERR_LENGTH || memcmp(x_copy, y, sizeof y) != 0 || layer.batches != batches) fail("bad count", 0);
}

int main(void) {
    fw_puts("batchnorm C ABI on Cortex-M4 (mps2-an386)\n");
    bn_config keras = bn_config_keras();
    layer_round("keras NHWC 4x16x8", keras, bn_shape_nhwc(N, S, C));
    layer_round("pytorch NCHW 4x8x16", bn_config_pytorch(), bn_shape_nchw(N, C, S));

    for (unsigned i = 0; i < sizeof stack_uses / sizeof stack_uses[0] && stack_uses[i].name; i++) {
        fw_puts("stack ");
        fw_puts(stack_uses[i].name);
        fw_puts(": ");
        fw_put_u32(stack_uses[i].max);
        fw_puts(" bytes\n");
    }
    fw_put_u32(checks);
    fw_puts(" checks, ");
    fw_put_u32((uint32_t)failures);
    fw_puts(failures ? " failed\nFAIL\n" : " failed\nPASS\n");
    return failures != 0;
}
