/*
 * A C firmware image for the Cortex-M4 (qemu mps2-an386) that links
 * libbatchnorm_c.a built for thumbv7em-none-eabihf and runs a training and
 * inference round through the C header:
 *
 *   - a Keras-configured NHWC layer and a PyTorch-configured NCHW layer,
 *     each trained for three steps (bn_layer_train, then
 *     bn_layer_train_in_place) and run in inference (bn_layer_infer);
 *   - bn_moments, bn_fold and bn_affine on the last batch;
 *   - the backward pass of the last training step (bn_layer_backward and
 *     bn_backward_in_place) and bn_layer_fold_into_weights;
 *   - one bad call (a wrong count): BN_ERR_LENGTH and nothing written.
 *
 * Every result is checked against f64 oracles (two-pass moments, fold,
 * normalization, moving update, backward, fold into weights) within the
 * crate docs §3 bounds that tests/golden.rs and capi/tests/test.c use
 * (the backward bounds of src/backward.rs's docs, as
 * reference::check_backward applies them; the fold into weights exactly). The stack of each call is
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
static struct stack_use stack_uses[12];

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

/* ---- backward ------------------------------------------------------------ */

static float x[LEN], y[LEN], x_copy[LEN];
static float scale[C], offset[C], mm[C], mv[C], bm[C], bv[C], prev_mm[C], prev_mv[C], a[C], b[C];
static float x_train[LEN], dy[LEN], dx[LEN], dx2[LEN];

/* Training-mode backward of the layer's last step (x holds that step's
 * input) checked against the f64 oracle; bn_backward_in_place must agree
 * bit for bit. */
static void backward_round(const bn_layer *layer, bn_shape sh) {
    static const double TINY = 1.401298464324817e-45; /* 2^-149 */
    const double SUM = 36.0 * EPS;                     /* reference::BACKWARD_SUM */
    float ds[C], dof[C], ds2[C], dof2[C];
    for (size_t i = 0; i < LEN; i++) dy[i] = uniform();
    ok(MEASURED("bn_layer_backward", bn_layer_backward(layer, x_train, LEN, dy, LEN, sh, scale, offset, dx, LEN, ds, dof)),
       "layer_backward");
    bn_params p = {layer->batch_mean, layer->batch_variance, scale, offset, C, layer->config.epsilon,
                   layer->config.activation};
    memcpy(dx2, dy, sizeof dy);
    ok(MEASURED("bn_backward_in_place", bn_backward_in_place(x_train, LEN, dx2, LEN, sh, &p, BN_MODE_TRAINING, ds2, dof2)),
       "backward_in_place");
    checks++;
    if (memcmp(dx, dx2, sizeof dx) || memcmp(ds, ds2, sizeof ds) || memcmp(dof, dof2, sizeof dof))
        fail("backward in place differs", 0);
    double count = (double)(sh.batch * sh.spatial), uf_sum = (count + 8.0) * TINY;
    for (size_t c = 0; c < C; c++) {
        double mean = p.mean[c], inv = 1.0 / sqrt((double)p.variance[c] + (double)p.epsilon);
        double sg = 0, sgd = 0, abs_g = 0, abs_gd = 0;
        for (size_t n = 0; n < sh.batch; n++)
            for (size_t s = 0; s < sh.spatial; s++) {
                size_t i = index_of(sh, n, s, c);
                double g = dy[i], d = (double)x_train[i] - mean;
                sg += g, sgd += g * d, abs_g += fabs(g), abs_gd += fabs(g * d);
            }
        double dscale = sgd * inv, pc = scale[c] * inv, q = -pc * inv * dscale / count, r = -pc * sg / count;
        within("doffset", (uint32_t)c, dof[c], sg, SUM * abs_g + half_ulp(sg) + uf_sum);
        within("dscale", (uint32_t)c, ds[c], dscale, SUM * inv * abs_gd + inv * uf_sum + half_ulp(dscale) + uf_sum);
        for (size_t n = 0; n < sh.batch; n++)
            for (size_t s = 0; s < sh.spatial; s++) {
                size_t i = index_of(sh, n, s, c);
                double g = dy[i], d = (double)x_train[i] - mean, want = g * pc + d * q + r;
                double bound = 4.0 * EPS * (fabs(pc * g) + fabs(q * d) + fabs(r)) +
                               SUM * fabs(pc) / count * (abs_g + inv * inv * fabs(d) * abs_gd) + half_ulp(want) +
                               (fabs(g) + fabs(d) + 8.0) * TINY + fabs(pc) / count * (inv * inv * fabs(d) * uf_sum + uf_sum);
                within("dx", (uint32_t)i, dx[i], want, bound);
            }
    }
}

/* ---- the round ---------------------------------------------------------- */


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
    memcpy(x_train, x, sizeof x); /* the last step's input, for backward */
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

    /* the backward pass of the last training step (fresh dy; activation
     * none), against the f64 oracle of src/reference.rs within the bounds
     * of the backward module docs (reference::check_backward) */
    backward_round(&layer, sh);

    /* folding the trained layer into a Dense [in 5, out C] weight */
    static float w[5 * C], w0[5 * C], bias_out[C];
    for (size_t i = 0; i < 5 * C; i++) w[i] = w0[i] = uniform();
    bn_weight_layout out_last = {BN_WEIGHTS_OUT_LAST, 0, 0, 0};
    ok(MEASURED("bn_layer_fold_into_weights",
                bn_layer_fold_into_weights(&layer, w, 5 * C, NULL, out_last, scale, offset, bias_out)),
       "fold_into_weights");
    for (size_t i = 0; i < 5 * C; i++) {
        size_t c = i % C;
        double ac = (double)scale[c] / sqrt((double)mv[c] + (double)cfg.epsilon);
        checks++;
        if (w[i] != (float)((double)w0[i] * ac)) fail("folded weight (one rounding of f64)", (uint32_t)i);
        if (i < C) {
            checks++;
            if (bias_out[c] != (float)((0.0 - (double)mm[c]) * ac + (double)offset[c])) fail("folded bias", (uint32_t)c);
        }
    }

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
