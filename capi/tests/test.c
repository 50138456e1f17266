/*
 * The C ABI against the golden vectors, through the generated header only.
 *
 *   python3 capi/tests/gen_vectors.py tests/data target/capi/vectors.h
 *   cc -std=c11 -Wall -Wextra -Werror -ffp-contract=off -Icapi/include \
 *      -Itarget/capi capi/tests/test.c target/release/libbatchnorm_c.a \
 *      -lm -lpthread -ldl -o target/capi/test && target/capi/test
 *
 * (.ci/capi does this.) Every tolerance is the one tests/golden.rs derives
 * from crate docs §3, ported as written there (mean_tol, var_tol,
 * normalize_bound, framework_tolerance, stats_sensitivity,
 * perturbed_tolerance and the moving-statistics bounds); see that file
 * for each derivation. The f64 oracles (two-pass moments, fold,
 * normalize, moving update) are the ones of src/reference.rs, written
 * out in C doubles (built with -ffp-contract=off so no fused multiply-add
 * changes their rounding).
 *
 * Then every status code is provoked on bad input, with a check that
 * nothing was written.
 */
#include "batchnorm.h"

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { BN_FW_KERAS, BN_FW_PYTORCH, BN_FW_PYTORCH_CUMULATIVE };

struct norm_case {
    const char *name;
    bn_shape shape;
    float epsilon;
    const float *x, *mean, *variance, *scale, *offset, *y;
};

struct layer_case {
    const char *name;
    int framework;
    bn_shape shape;
    float epsilon;
    double momentum; /* the framework's argument (PyTorch: 0 for None) */
    int defaults;    /* built with the framework's default arguments */
    const float *scale, *offset, *moving_mean_init, *moving_variance_init;
    int steps;
    const float *const *x, *const *y, *const *moving_mean, *const *moving_variance;
    const uint64_t *tracked; /* PyTorch's num_batches_tracked, or NULL */
    const double *fw_decay, *fw_weight; /* per step, as the framework rounds them */
    const float *x_infer, *y_infer;
};

#include "vectors.h"

#define N_ELEMS(a) (sizeof(a) / sizeof((a)[0]))

static const double EPS = FLT_EPSILON; /* the epsilon of crate docs §3 */
static const double U = FLT_EPSILON / 2;
/* Ulps of TensorFlow's (and PyTorch's) `a` beyond correct rounding. */
static const double A_ULPS = 1.0;

static int failures = 0;
static long checks = 0;

#define CHECK(cond, ...)                                                            \
    do {                                                                            \
        checks++;                                                                   \
        if (!(cond)) {                                                              \
            failures++;                                                             \
            if (failures <= 30) {                                                   \
                fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                \
                fprintf(stderr, __VA_ARGS__);                                       \
                fputc('\n', stderr);                                                \
            }                                                                       \
        }                                                                           \
    } while (0)

/* The largest |error| / bound of one comparison, printed at the end. */
struct worst {
    const char *what;
    double ratio;
};

static void within(struct worst *w, double got, double want, double bound, const char *at, size_t i) {
    double err = fabs(got - want);
    CHECK(err <= bound, "%s: %s[%zu]: got %.9g, want %.9g, |error| %.3g > bound %.3g", w->what, at,
          i, got, want, err, bound);
    if (err > 0 && err / bound > w->ratio) w->ratio = err / bound;
}

static void expect_status(bn_status got, bn_status want, const char *what) {
    CHECK(got == want, "%s: got %s, want %s", what, bn_status_name(got), bn_status_name(want));
}

/* ---------------------------------------------------------------------- */
/* f64 oracles and bounds (src/reference.rs, tests/golden.rs)              */

static size_t count_of(bn_shape s) { return s.batch * s.spatial; }
static size_t len_of(bn_shape s) { return s.batch * s.spatial * s.channels; }

/* Index of element (n, s, c). */
static size_t index_of(bn_shape sh, size_t n, size_t s, size_t c) {
    if (sh.layout == BN_LAYOUT_NHWC) return (n * sh.spatial + s) * sh.channels + c;
    return (n * sh.channels + c) * sh.spatial + s;
}

static size_t channel_of(bn_shape sh, size_t i) {
    if (sh.layout == BN_LAYOUT_NHWC) return i % sh.channels;
    return (i / sh.spatial) % sh.channels;
}

/* Two-pass mean and population variance of channel c. */
static void channel_moments(const float *x, bn_shape sh, size_t c, double *mean, double *var) {
    double sum = 0, ss = 0, count = (double)count_of(sh);
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

static void ref_fold(float mean, float var, float scale, float offset, float eps, double *a, double *b) {
    *a = (double)scale / sqrt((double)var + (double)eps);
    *b = (double)offset - (double)mean * *a;
}

static double half_ulp(double r) { return fabs((double)(float)r - r); }

static double mean_bound(double m, double v) { return 1e-6 * (fabs(m) + sqrt(v)); }
static double variance_rel_bound(double m, double v) { return fabs(m) <= 10.0 * sqrt(v) ? 1e-5 : 1e-3; }
static double mean_tol(double m, double v) { return mean_bound(m, v) + half_ulp(m); }
static double var_tol(double m, double v) { return variance_rel_bound(m, v) * v + half_ulp(v); }

static double normalize_bound(float x, float mean, double a, float offset) {
    return 4.0 * EPS * (fabs((double)x * a) + fabs((double)mean * a) + fabs((double)offset));
}

static double framework_tolerance(float x, float mean, double a, float offset, double a_ulps) {
    return 2.0 * normalize_bound(x, mean, a, offset) +
           a_ulps * EPS * (fabs((double)x * a) + fabs((double)mean * a));
}

static double stats_sensitivity(double x, double m, double v, double g, double e, double dm, double dv) {
    CHECK(v + e - dv > 0, "variance bound %g swallows v + e", dv);
    double k = pow((v + e) / (v + e - dv), 1.5);
    double a = fabs(g / sqrt(v + e));
    return k * (a * dm + fabs(x - m) * a * dv / (2.0 * (v + e)));
}

static double perturbed_tolerance(double x, double m, double v, double dm, double dv, double sides,
                                  double g, double offset, double e, double a_ulps) {
    double k = pow((v + e) / (v + e - dv), 1.5);
    double a = k * fabs(g / sqrt(v + e));
    double xa_ma = (fabs(x) + fabs(m) + dm) * a;
    return sides * stats_sensitivity(x, m, v, g, e, dm, dv) + 2.0 * 4.0 * EPS * (xa_ma + fabs(offset)) +
           a_ulps * EPS * xa_ma;
}

/* ---------------------------------------------------------------------- */
/* normalize.json: normalize, normalize_in_place, fold + affine (and in place) */

static void normalize_cases(void) {
    struct worst w_ref = {"normalize.json: y vs f64 reference (section 3)", 0};
    struct worst w_tf = {"normalize.json: y vs TensorFlow (2x section 3 + 1 ulp of a)", 0};
    for (size_t k = 0; k < N_ELEMS(NORM_CASES); k++) {
        const struct norm_case *t = &NORM_CASES[k];
        size_t n = len_of(t->shape), ch = t->shape.channels;
        float *y = malloc(n * sizeof *y), *a = malloc(ch * sizeof *a), *b = malloc(ch * sizeof *b);
        bn_params p = {t->mean, t->variance, t->scale, t->offset, ch, t->epsilon, {BN_ACTIVATION_NONE, 0, 0}};

        expect_status(bn_fold(t->mean, t->variance, t->scale, t->offset, ch, t->epsilon, a, b), BN_OK, t->name);
        for (size_t c = 0; c < ch; c++) {
            double ra, rb;
            ref_fold(t->mean[c], t->variance[c], t->scale ? t->scale[c] : 1.0f, t->offset ? t->offset[c] : 0.0f,
                     t->epsilon, &ra, &rb);
            /* reference::check_fold: the f64 fold rounded once, bit for bit */
            CHECK(a[c] == (float)ra && b[c] == (float)rb, "%s: fold[%zu] (%.9g, %.9g) vs (%.9g, %.9g)", t->name, c,
                  a[c], b[c], (float)ra, (float)rb);
        }
        for (int path = 0; path < 4; path++) {
            static const char *names[] = {"normalize", "normalize_in_place", "fold+affine", "fold+affine_in_place"};
            bn_activation none = {BN_ACTIVATION_NONE, 0, 0};
            bn_status st;
            for (size_t i = 0; i < n; i++) y[i] = NAN;
            if (path == 1 || path == 3) memcpy(y, t->x, n * sizeof *y);
            switch (path) {
            case 0: st = bn_normalize(t->x, n, y, n, t->shape, &p); break;
            case 1: st = bn_normalize_in_place(y, n, t->shape, &p); break;
            case 2: st = bn_affine(t->x, n, y, n, t->shape, a, b, ch, none); break;
            default: st = bn_affine_in_place(y, n, t->shape, a, b, ch, none); break;
            }
            expect_status(st, BN_OK, names[path]);
            char at[160];
            snprintf(at, sizeof at, "%s %s", t->name, names[path]);
            for (size_t i = 0; i < n; i++) {
                size_t c = channel_of(t->shape, i);
                float of = t->offset ? t->offset[c] : 0.0f;
                double ra, rb;
                ref_fold(t->mean[c], t->variance[c], t->scale ? t->scale[c] : 1.0f, of, t->epsilon, &ra, &rb);
                double want = (double)t->x[i] * ra + rb;
                within(&w_ref, y[i], want, normalize_bound(t->x[i], t->mean[c], ra, of) + half_ulp(want), at, i);
                within(&w_tf, y[i], t->y[i], framework_tolerance(t->x[i], t->mean[c], ra, of, A_ULPS), at, i);
            }
        }
        free(y);
        free(a);
        free(b);
    }
    printf("  %-70s max error/bound %.3f\n", w_ref.what, w_ref.ratio);
    printf("  %-70s max error/bound %.3f\n", w_tf.what, w_tf.ratio);
}

/* ---------------------------------------------------------------------- */
/* keras_train.json and pytorch_train.json through one bn_layer per case   */

struct layer_worst {
    struct worst stats, y_ref, y_fw, moving_ref, moving_fw, infer_ref, infer_fw;
};

/* Our decay and weight for the b-th batch (src/ema.rs: Decay(d) is
 * (d, 1 - d) in f32; the cumulative average forms 1/b and 1 - 1/b in f64
 * and rounds each once), and the exact ones of the f64 reference. */
static void factors(const bn_config *cfg, uint64_t b, double *d, double *w, double *d_ref, double *w_ref) {
    if (cfg->momentum == BN_MOMENTUM_DECAY) {
        *d = cfg->decay;
        *w = (float)(1.0f - cfg->decay);
        *d_ref = cfg->decay;
        *w_ref = 1.0 - (double)cfg->decay;
    } else {
        double r = 1.0 / (double)(b ? b : 1);
        *d = (float)(1.0 - r);
        *w = (float)r;
        *d_ref = 1.0 - r;
        *w_ref = r;
    }
}

static void train_step(const struct layer_case *t, bn_layer *layer, int in_place, int s, const float *prev_mm,
                       const float *prev_mv, const float *prev_fw_mm, const float *prev_fw_mv, const char *label,
                       struct layer_worst *w) {
    bn_shape sh = t->shape;
    size_t n = len_of(sh), ch = sh.channels;
    double e = t->epsilon;
    const float *x = t->x[s];
    float *y = malloc(n * sizeof *y);
    bn_status st;
    if (in_place) {
        memcpy(y, x, n * sizeof *y);
        st = bn_layer_train_in_place(layer, y, n, sh, t->scale, t->offset);
    } else {
        for (size_t i = 0; i < n; i++) y[i] = NAN;
        st = bn_layer_train(layer, x, n, y, n, sh, t->scale, t->offset);
    }
    expect_status(st, BN_OK, label);
    uint64_t batches = (uint64_t)s + 1;
    CHECK(layer->batches == batches, "%s: batches %llu", label, (unsigned long long)layer->batches);
    if (t->tracked) CHECK(layer->batches == t->tracked[s], "%s: num_batches_tracked", label);
    const float *bm = layer->batch_mean, *bv = layer->batch_variance;
    double *em = malloc(ch * sizeof *em), *ev = malloc(ch * sizeof *ev);

    /* Batch statistics within the section 3 bounds of the exact moments. */
    for (size_t c = 0; c < ch; c++) {
        channel_moments(x, sh, c, &em[c], &ev[c]);
        within(&w->stats, bm[c], em[c], mean_tol(em[c], ev[c]), label, c);
        within(&w->stats, bv[c], ev[c], var_tol(em[c], ev[c]), label, c);
    }
    /* y against the f64 normalization with our batch statistics, and
     * against the framework's y (each side within the section 3 bounds of
     * the exact statistics: perturbed_tolerance with two sides). */
    for (size_t i = 0; i < n; i++) {
        size_t c = channel_of(sh, i);
        double a, b;
        ref_fold(bm[c], bv[c], t->scale[c], t->offset[c], t->epsilon, &a, &b);
        double want = (double)x[i] * a + b;
        within(&w->y_ref, y[i], want, normalize_bound(x[i], bm[c], a, t->offset[c]) + half_ulp(want), label, i);
        double tol = perturbed_tolerance(x[i], em[c], ev[c], mean_tol(em[c], ev[c]), var_tol(em[c], ev[c]), 2.0,
                                         t->scale[c], t->offset[c], e, A_ULPS);
        within(&w->y_fw, y[i], t->y[s][i], tol, label, i);
    }

    /* Moving statistics: against the f64 update of our own inputs, and
     * against the framework's (tests/golden.rs, train_step). */
    double d, w_ours, d_ref, w_ref;
    factors(&layer->config, batches, &d, &w_ours, &d_ref, &w_ref);
    double d_fw = t->fw_decay[s], w_fw = t->fw_weight[s];
    uint64_t count = count_of(sh);
    double bessel = layer->config.moving_variance == BN_VARIANCE_SAMPLE && count > 1
                        ? (double)count / (double)(count - 1)
                        : 1.0;
    double rounds = bessel == 1.0 ? 2.0 : 3.0;
    for (size_t c = 0; c < ch; c++) {
        double rm = (double)prev_mm[c] * d_ref + (double)bm[c] * w_ref;
        double rv = (double)prev_mv[c] * d_ref + (double)bv[c] * bessel * w_ref;
        double d_err = fabs(d - d_ref), w_err = fabs(w_ours - w_ref);
        for (int which = 0; which < 2; which++) {
            double got = which ? layer->moving_variance[c] : layer->moving_mean[c];
            double mo = fabs(which ? prev_mv[c] : prev_mm[c]);
            double b = fabs(which ? bv[c] * bessel : bm[c]);
            double bound = (rounds * U + U * U) * (mo * d + b * w_ours) + mo * d_err + b * w_err;
            within(&w->moving_ref, got, which ? rv : rm, bound, label, c);

            double fw = which ? t->moving_variance[s][c] : t->moving_mean[s][c];
            double m_ours = which ? prev_mv[c] : prev_mm[c];
            double m_fw = which ? prev_fw_mv[c] : prev_fw_mm[c];
            double bx = which ? ev[c] * bessel : em[c];
            double db = which ? var_tol(em[c], ev[c]) * bessel : mean_tol(em[c], ev[c]);
            double b_abs = fabs(bx) + db;
            double round = (rounds * U + U * U) * (fabs(m_ours) * d + b_abs * w_ours + fabs(m_fw) * d_fw + b_abs * w_fw);
            double dw = b_abs * fabs(w_ours - w_fw) + fabs(m_fw) * fabs(d - d_fw);
            double tol = d * fabs(m_ours - m_fw) + w_ours * 2.0 * db + dw + round;
            within(&w->moving_fw, got, fw, tol, label, c);
        }
    }
    free(y);
    free(em);
    free(ev);
}

static void infer_step(const struct layer_case *t, const bn_layer *layer, int in_place, const float *fw_mm,
                       const float *fw_mv, const char *label, struct layer_worst *w) {
    bn_shape sh = t->shape;
    size_t n = len_of(sh);
    const float *x = t->x_infer;
    float *y = malloc(n * sizeof *y);
    bn_status st;
    if (in_place) {
        memcpy(y, x, n * sizeof *y);
        st = bn_layer_infer_in_place(layer, y, n, sh, t->scale, t->offset);
    } else {
        for (size_t i = 0; i < n; i++) y[i] = NAN;
        st = bn_layer_infer(layer, x, n, y, n, sh, t->scale, t->offset);
    }
    expect_status(st, BN_OK, label);
    const float *mm = layer->moving_mean, *mv = layer->moving_variance;
    for (size_t i = 0; i < n; i++) {
        size_t c = channel_of(sh, i);
        double a, b;
        ref_fold(mm[c], mv[c], t->scale[c], t->offset[c], t->epsilon, &a, &b);
        double want = (double)x[i] * a + b;
        within(&w->infer_ref, y[i], want, normalize_bound(x[i], mm[c], a, t->offset[c]) + half_ulp(want), label, i);
        double m = fw_mm[c], v = fw_mv[c];
        double tol = perturbed_tolerance(x[i], m, v, fabs(mm[c] - m), fabs(mv[c] - v), 1.0, t->scale[c], t->offset[c],
                                         t->epsilon, A_ULPS);
        within(&w->infer_fw, y[i], t->y_infer[i], tol, label, i);
    }
    free(y);
}

static bn_config config_of(const struct layer_case *t) {
    bn_config cfg;
    switch (t->framework) {
    case BN_FW_KERAS:
        cfg = bn_config_keras();
        if (t->defaults) {
            CHECK(cfg.decay == (float)t->momentum && cfg.epsilon == t->epsilon, "%s: Keras defaults", t->name);
        }
        cfg.decay = (float)t->momentum;
        break;
    case BN_FW_PYTORCH:
        cfg = bn_config_pytorch_momentum((float)t->momentum);
        if (t->defaults) {
            bn_config d = bn_config_pytorch();
            CHECK(memcmp(&d, &cfg, sizeof d) == 0 && d.epsilon == t->epsilon, "%s: PyTorch defaults", t->name);
        }
        break;
    default:
        cfg = bn_config_pytorch_cumulative();
        break;
    }
    cfg.epsilon = t->epsilon;
    return cfg;
}

static void layer_cases(void) {
    struct layer_worst w = {
        {"layers: batch mean/variance vs f64 two-pass (section 3)", 0},
        {"layers: y_train vs f64 reference (section 3, our batch stats)", 0},
        {"layers: y_train vs framework (propagated section 3 bounds)", 0},
        {"layers: moving stats vs f64 update of our inputs", 0},
        {"layers: moving stats vs framework", 0},
        {"layers: y_infer vs f64 reference (section 3, our moving stats)", 0},
        {"layers: y_infer vs framework", 0},
    };
    for (size_t k = 0; k < N_ELEMS(LAYER_CASES); k++) {
        const struct layer_case *t = &LAYER_CASES[k];
        size_t ch = t->shape.channels;
        for (int in_place = 0; in_place < 2; in_place++) {
            float *mm = malloc(ch * sizeof *mm), *mv = malloc(ch * sizeof *mv);
            float *bm = malloc(ch * sizeof *bm), *bv = malloc(ch * sizeof *bv);
            float *prev_mm = malloc(ch * sizeof *mm), *prev_mv = malloc(ch * sizeof *mv);
            memcpy(mm, t->moving_mean_init, ch * sizeof *mm);
            memcpy(mv, t->moving_variance_init, ch * sizeof *mv);
            bn_layer layer;
            expect_status(bn_layer_init(&layer, config_of(t), ch, mm, mv, bm, bv), BN_OK, t->name);
            const float *fw_mm = t->moving_mean_init, *fw_mv = t->moving_variance_init;
            for (int s = 0; s < t->steps; s++) {
                char label[160];
                snprintf(label, sizeof label, "%s %s step %d", t->name, in_place ? "train_in_place" : "train", s + 1);
                memcpy(prev_mm, mm, ch * sizeof *mm);
                memcpy(prev_mv, mv, ch * sizeof *mv);
                train_step(t, &layer, in_place, s, prev_mm, prev_mv, fw_mm, fw_mv, label, &w);
                fw_mm = t->moving_mean[s];
                fw_mv = t->moving_variance[s];
            }
            char label[160];
            snprintf(label, sizeof label, "%s %s", t->name, in_place ? "infer_in_place" : "infer");
            infer_step(t, &layer, in_place, fw_mm, fw_mv, label, &w);
            free(mm), free(mv), free(bm), free(bv), free(prev_mm), free(prev_mv);
        }
    }
    struct worst *all[] = {&w.stats, &w.y_ref, &w.y_fw, &w.moving_ref, &w.moving_fw, &w.infer_ref, &w.infer_fw};
    for (size_t i = 0; i < N_ELEMS(all); i++) printf("  %-70s max error/bound %.3f\n", all[i]->what, all[i]->ratio);
}

/* ---------------------------------------------------------------------- */
/* Moments records: moments, accumulate in chunks, merge, the wire format  */

static void moments_records(void) {
    struct worst w = {"moments/accumulate/merge on the Keras inputs vs f64 two-pass", 0};
    const struct layer_case *t = &LAYER_CASES[0];
    bn_shape sh = t->shape; /* NHWC */
    size_t n = len_of(sh), ch = sh.channels, rows = sh.batch * sh.spatial;
    float *mean = malloc(ch * sizeof *mean), *var = malloc(ch * sizeof *var);
    bn_moments_record *left = calloc(ch, sizeof *left), *right = calloc(ch, sizeof *right);
    const float *x = t->x[0];
    expect_status(bn_moments(x, n, sh, mean, var, ch), BN_OK, "bn_moments");
    size_t cut = rows / 3;
    expect_status(bn_accumulate(x, cut * ch, bn_shape_rows(cut, ch), left, ch), BN_OK, "bn_accumulate left");
    expect_status(bn_accumulate(x + cut * ch, (rows - cut) * ch, bn_shape_rows(rows - cut, ch), right, ch), BN_OK,
                  "bn_accumulate right");
    for (size_t c = 0; c < ch; c++) {
        double m, v, am, av, sv;
        channel_moments(x, sh, c, &m, &v);
        within(&w, mean[c], m, mean_tol(m, v), "bn_moments mean", c);
        within(&w, var[c], v, var_tol(m, v), "bn_moments variance", c);
        /* a record through the wire format, then merged */
        uint8_t wire[BN_MOMENTS_BYTES];
        bn_moments_record received, merged;
        expect_status(bn_moments_to_le_bytes(right[c], wire), BN_OK, "to_le_bytes");
        expect_status(bn_moments_from_le_bytes(wire, &received), BN_OK, "from_le_bytes");
        CHECK(memcmp(&received, &right[c], sizeof received) == 0, "wire round trip [%zu]", c);
        uint64_t count_le = 0;
        for (int b = 7; b >= 0; b--) count_le = count_le << 8 | wire[b];
        CHECK(count_le == right[c].count, "wire: count little-endian first");
        expect_status(bn_moments_merge(left[c], received, &merged), BN_OK, "merge");
        CHECK(merged.count == rows, "merged count %llu", (unsigned long long)merged.count);
        expect_status(bn_moments_mean(merged, &am), BN_OK, "mean");
        expect_status(bn_moments_variance(merged, BN_VARIANCE_POPULATION, &av), BN_OK, "variance");
        expect_status(bn_moments_variance(merged, BN_VARIANCE_SAMPLE, &sv), BN_OK, "sample variance");
        within(&w, am, m, mean_tol(m, v), "merged mean", c);
        within(&w, av, v, var_tol(m, v), "merged variance", c);
        within(&w, sv, v * rows / (rows - 1), var_tol(m, v) * rows / (rows - 1), "merged sample variance", c);
    }
    printf("  %-70s max error/bound %.3f\n", w.what, w.ratio);
    free(mean), free(var), free(left), free(right);
}

/* ---------------------------------------------------------------------- */
/* Every status code on bad input; nothing written on error               */

#define SENTINEL 12345.0f

static int untouched(const float *p, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (p[i] != SENTINEL) return 0;
    return 1;
}

static void fill(float *p, size_t n) {
    for (size_t i = 0; i < n; i++) p[i] = SENTINEL;
}

static void error_codes(void) {
    static const char *names[] = {"BN_OK", "BN_ERR_ZERO_CHANNELS", "BN_ERR_SHAPE_OVERFLOW", "BN_ERR_LENGTH",
                                  "BN_ERR_EMPTY_BATCH", "BN_ERR_EPSILON", "BN_ERR_DECAY", "BN_ERR_COUNT_OVERFLOW",
                                  "BN_ERR_CLAMP", "BN_ERR_WEIGHTS", "BN_ERR_NULL_POINTER", "BN_ERR_MISALIGNED",
                                  "BN_ERR_OVERLAP", "BN_ERR_BAD_ENUM", "BN_ERR_UNKNOWN"};
    for (int code = 0; code < (int)N_ELEMS(names); code++)
        CHECK(strcmp(bn_status_name(code), names[code]) == 0, "name of %d: %s", code, bn_status_name(code));
    CHECK(BN_ERR_UNKNOWN == 14 && strstr(bn_status_name(15), "unknown") && strstr(bn_status_name(-1), "unknown"),
          "names of non-codes");

    /* A 2 x 3 tensor (rows), its statistics and outputs. */
    float x[6] = {1, 2, 3, 4, 5, 7}, y[6], mean[3], var[3], a[3], b[3];
    float mom[3] = {0, 0, 0}, mov[3] = {1, 1, 1}, bm[3], bv[3];
    _Alignas(16) float big[8];
    bn_shape sh = bn_shape_rows(2, 3);
    bn_activation none = {BN_ACTIVATION_NONE, 0, 0};
    float ones[3] = {1, 1, 1}, zeros[3] = {0, 0, 0};
    bn_params p = {ones, ones, NULL, NULL, 3, 1e-3f, none};
    bn_moments_record rec[3] = {{0}}, out;
    double d;

#define EXPECT(call, want, outbuf, outlen)                                                  \
    do {                                                                                   \
        fill(outbuf, outlen);                                                              \
        expect_status(call, want, #call);                                                  \
        CHECK(untouched(outbuf, outlen), "%s wrote on error", #call);                      \
    } while (0)

    /* BN_ERR_ZERO_CHANNELS */
    EXPECT(bn_moments(x, 0, bn_shape_rows(2, 0), mean, var, 0), BN_ERR_ZERO_CHANNELS, mean, 3);
    EXPECT(bn_fold(NULL, NULL, NULL, NULL, 0, 1e-3f, a, b), BN_ERR_ZERO_CHANNELS, a, 3);
    /* BN_ERR_SHAPE_OVERFLOW */
    EXPECT(bn_moments(x, 6, bn_shape_nhwc(SIZE_MAX / 2, 3, 1), mean, var, 1), BN_ERR_SHAPE_OVERFLOW, mean, 3);
    EXPECT(bn_affine(x, 6, y, 6, bn_shape_nhwc(2, SIZE_MAX, 3), a, b, 3, none), BN_ERR_SHAPE_OVERFLOW, y, 6);
    /* BN_ERR_LENGTH: a tensor count, a per-channel count */
    EXPECT(bn_moments(x, 5, sh, mean, var, 3), BN_ERR_LENGTH, mean, 3);
    EXPECT(bn_moments(x, 6, sh, mean, var, 2), BN_ERR_LENGTH, mean, 3);
    EXPECT(bn_normalize(x, 6, y, 5, sh, &p), BN_ERR_LENGTH, y, 6);
    /* BN_ERR_EMPTY_BATCH */
    EXPECT(bn_moments(NULL, 0, bn_shape_rows(0, 3), mean, var, 3), BN_ERR_EMPTY_BATCH, mean, 3);
    expect_status(bn_moments_mean(rec[0], &d), BN_ERR_EMPTY_BATCH, "mean of an empty record");
    expect_status(bn_moments_variance(rec[0], BN_VARIANCE_SAMPLE, &d), BN_ERR_EMPTY_BATCH, "variance, empty record");
    /* BN_ERR_EPSILON: zero, negative, NaN, infinite */
    float bad_eps[] = {0.0f, -1e-3f, NAN, INFINITY};
    for (size_t i = 0; i < N_ELEMS(bad_eps); i++) {
        bn_params q = p;
        q.epsilon = bad_eps[i];
        EXPECT(bn_normalize(x, 6, y, 6, sh, &q), BN_ERR_EPSILON, y, 6);
        EXPECT(bn_fold(ones, ones, NULL, NULL, 3, bad_eps[i], a, b), BN_ERR_EPSILON, a, 3);
    }
    /* BN_ERR_DECAY, BN_ERR_CLAMP, BN_ERR_BAD_ENUM through a layer */
    bn_layer layer;
    bn_config cfg = bn_config_keras();
    expect_status(bn_layer_init(&layer, cfg, 3, mom, mov, bm, bv), BN_OK, "layer init");
    float bad_decay[] = {-0.5f, 1.5f, NAN};
    for (size_t i = 0; i < N_ELEMS(bad_decay); i++) {
        bn_layer l = layer;
        l.config.decay = bad_decay[i];
        EXPECT(bn_layer_train(&l, x, 6, y, 6, sh, NULL, NULL), BN_ERR_DECAY, y, 6);
        CHECK(l.batches == 0 && mom[0] == 0 && mov[0] == 1, "layer state changed on error");
        EXPECT(bn_layer_infer(&l, x, 6, y, 6, sh, NULL, NULL), BN_ERR_DECAY, y, 6);
        bn_config c = cfg;
        c.decay = bad_decay[i];
        expect_status(bn_layer_init(&l, c, 3, mom, mov, bm, bv), BN_ERR_DECAY, "layer init, bad decay");
    }
    bn_activation clamps[] = {{BN_ACTIVATION_CLAMP, 1, 0}, {BN_ACTIVATION_CLAMP, NAN, 1}, {BN_ACTIVATION_CLAMP, 0, NAN}};
    for (size_t i = 0; i < N_ELEMS(clamps); i++) {
        EXPECT(bn_affine(x, 6, y, 6, sh, ones, zeros, 3, clamps[i]), BN_ERR_CLAMP, y, 6);
        bn_layer l = layer;
        l.config.activation = clamps[i];
        EXPECT(bn_layer_train(&l, x, 6, y, 6, sh, NULL, NULL), BN_ERR_CLAMP, y, 6);
    }
    {
        bn_layer l = layer;
        l.config.momentum = 2;
        EXPECT(bn_layer_train(&l, x, 6, y, 6, sh, NULL, NULL), BN_ERR_BAD_ENUM, y, 6);
        l = layer;
        l.config.moving_variance = 7;
        EXPECT(bn_layer_train(&l, x, 6, y, 6, sh, NULL, NULL), BN_ERR_BAD_ENUM, y, 6);
        bn_activation odd = {4, 0, 0};
        EXPECT(bn_affine(x, 6, y, 6, sh, ones, zeros, 3, odd), BN_ERR_BAD_ENUM, y, 6);
        bn_shape bad = sh;
        bad.layout = 2;
        EXPECT(bn_moments(x, 6, bad, mean, var, 3), BN_ERR_BAD_ENUM, mean, 3);
        expect_status(bn_moments_variance(rec[0], 2, &d), BN_ERR_BAD_ENUM, "variance kind");
        /* the layer's channels against the shape's */
        l = layer;
        l.channels = 2;
        EXPECT(bn_layer_train(&l, x, 6, y, 6, sh, NULL, NULL), BN_ERR_LENGTH, y, 6);
        EXPECT(bn_layer_infer(&l, x, 6, y, 6, sh, NULL, NULL), BN_ERR_LENGTH, y, 6);
        l.channels = 0;
        EXPECT(bn_layer_infer(&l, x, 6, y, 6, sh, NULL, NULL), BN_ERR_ZERO_CHANNELS, y, 6);
        /* an empty training batch */
        EXPECT(bn_layer_train(&layer, NULL, 0, y, 0, bn_shape_rows(0, 3), NULL, NULL), BN_ERR_EMPTY_BATCH, bm, 3);
        CHECK(layer.batches == 0, "batches counted on error");
    }
    /* BN_ERR_COUNT_OVERFLOW: merge and accumulate */
    bn_moments_record full = {UINT64_MAX, 1.0, 0.0}, one = {1, 2.0, 0.0};
    expect_status(bn_moments_merge(full, one, &out), BN_ERR_COUNT_OVERFLOW, "merge overflow");
    rec[1] = full;
    expect_status(bn_accumulate(x, 6, sh, rec, 3), BN_ERR_COUNT_OVERFLOW, "accumulate overflow");
    CHECK(rec[0].count == 0 && rec[1].count == UINT64_MAX, "accumulate wrote on error");
    rec[1] = rec[0];
    /* BN_ERR_NULL_POINTER: a non-empty buffer, a struct, an output */
    EXPECT(bn_moments(NULL, 6, sh, mean, var, 3), BN_ERR_NULL_POINTER, mean, 3);
    EXPECT(bn_moments(x, 6, sh, mean, NULL, 3), BN_ERR_NULL_POINTER, mean, 3);
    EXPECT(bn_normalize(x, 6, y, 6, sh, NULL), BN_ERR_NULL_POINTER, y, 6);
    expect_status(bn_moments_merge(one, one, NULL), BN_ERR_NULL_POINTER, "merge to NULL");
    expect_status(bn_moments_mean(one, NULL), BN_ERR_NULL_POINTER, "mean to NULL");
    expect_status(bn_moments_to_le_bytes(one, NULL), BN_ERR_NULL_POINTER, "bytes to NULL");
    expect_status(bn_moments_from_le_bytes(NULL, &out), BN_ERR_NULL_POINTER, "bytes from NULL");
    EXPECT(bn_layer_train(NULL, x, 6, y, 6, sh, NULL, NULL), BN_ERR_NULL_POINTER, y, 6);
    expect_status(bn_layer_init(&layer, cfg, 3, NULL, mov, bm, bv), BN_ERR_NULL_POINTER, "init without moving mean");
    {
        bn_layer l = layer; /* an inference-only layer cannot train */
        l.batch_mean = NULL;
        EXPECT(bn_layer_train(&l, x, 6, y, 6, sh, NULL, NULL), BN_ERR_NULL_POINTER, y, 6);
        EXPECT(bn_layer_infer(&l, x, 6, y, 6, sh, NULL, NULL), BN_OK, big, 0);
    }
    /* NULL with count 0 is an empty tensor: fine where empty is fine */
    expect_status(bn_affine(NULL, 0, NULL, 0, bn_shape_rows(0, 3), ones, zeros, 3, none), BN_OK, "empty affine");
    expect_status(bn_normalize(NULL, 0, NULL, 0, bn_shape_nchw(0, 3, 5), &p), BN_OK, "empty normalize");
    expect_status(bn_accumulate(NULL, 0, bn_shape_rows(0, 3), rec, 3), BN_OK, "empty accumulate");
    CHECK(rec[0].count == 0, "empty accumulate counted");
    /* BN_ERR_MISALIGNED */
    float *odd = (float *)((char *)big + 1);
    EXPECT(bn_affine(x, 6, odd, 6, sh, ones, zeros, 3, none), BN_ERR_MISALIGNED, y, 0);
    EXPECT(bn_moments(odd, 6, sh, mean, var, 3), BN_ERR_MISALIGNED, mean, 3);
    /* BN_ERR_OVERLAP: output == input, partial overlap, two outputs */
    EXPECT(bn_affine(y, 6, y, 6, sh, ones, zeros, 3, none), BN_ERR_OVERLAP, y, 6);
    EXPECT(bn_normalize(y, 6, y + 3, 3, bn_shape_rows(1, 3), &p), BN_ERR_OVERLAP, y, 6);
    EXPECT(bn_fold(ones, ones, NULL, NULL, 3, 1e-3f, a, a), BN_ERR_OVERLAP, a, 3);
    EXPECT(bn_moments(x, 6, sh, mean, mean, 3), BN_ERR_OVERLAP, mean, 3);
    {
        bn_layer l = layer; /* y over the moving mean */
        EXPECT(bn_layer_train(&l, x, 3, mom, 3, bn_shape_rows(1, 3), NULL, NULL), BN_ERR_OVERLAP, bm, 3);
        CHECK(mom[0] == 0 && l.batches == 0, "overlap: layer changed");
    }
    /* BN_ERR_WEIGHTS: 7 weights do not split into 3 output channels */
    {
        float w[7] = {1, 2, 3, 4, 5, 6, 7}, w0[7], bias_out[3];
        memcpy(w0, w, sizeof w);
        bn_weight_layout first = {BN_WEIGHTS_OUT_FIRST, 0, 0, 0};
        EXPECT(bn_fold_into_weights(w, 7, NULL, first, &p, bias_out), BN_ERR_WEIGHTS, bias_out, 3);
        CHECK(memcmp(w, w0, sizeof w) == 0, "weights changed on error");
        bn_weight_layout hwim = {BN_WEIGHTS_HWIM, 0, 0, 2}; /* 3 channels, multiplier 2 */
        EXPECT(bn_fold_into_weights(w, 6, NULL, hwim, &p, bias_out), BN_ERR_WEIGHTS, bias_out, 3);
        bn_weight_layout odd_kind = {9, 0, 0, 0};
        EXPECT(bn_fold_into_weights(w, 6, NULL, odd_kind, &p, bias_out), BN_ERR_BAD_ENUM, bias_out, 3);
        EXPECT(bn_fold_into_weights(w, 6, NULL, first, &p, w + 3), BN_ERR_OVERLAP, bias_out, 0);
        /* a Linear [out 3, in 2] with scale 1, variance 1, epsilon 1e-3: the
         * folded values against the f64 formula rounded once (fold.rs) */
        float bias[3] = {0.5f, -0.5f, 2.0f};
        EXPECT(bn_fold_into_weights(w, 6, bias, first, &p, bias_out), BN_OK, big, 0);
        for (int i = 0; i < 6; i++) {
            double a = 1.0 / sqrt(1.0 + (double)1e-3f);
            CHECK(w[i] == (float)(w0[i] * a), "folded w[%d] %.9g", i, w[i]);
        }
        for (int c = 0; c < 3; c++) {
            double a = 1.0 / sqrt(1.0 + (double)1e-3f);
            CHECK(bias_out[c] == (float)((bias[c] - 1.0) * a), "folded bias[%d] %.9g", c, bias_out[c]);
        }
    }
    /* backward: a bad mode, dx over dy, training mode on an empty batch */
    {
        float dy[6] = {1, -1, 0.5f, 2, 0, -0.5f}, dx[6], ds[3], dof[3];
        EXPECT(bn_backward(x, 6, dy, 6, sh, &p, 2, dx, 6, ds, dof), BN_ERR_BAD_ENUM, dx, 6);
        EXPECT(bn_backward(x, 6, dy, 6, sh, &p, BN_MODE_TRAINING, dy, 6, ds, dof), BN_ERR_OVERLAP, ds, 3);
        EXPECT(bn_backward(NULL, 0, NULL, 0, bn_shape_rows(0, 3), &p, BN_MODE_TRAINING, NULL, 0, ds, dof),
               BN_ERR_EMPTY_BATCH, ds, 3);
        EXPECT(bn_backward(x, 6, dy, 5, sh, &p, BN_MODE_TRAINING, dx, 6, ds, dof), BN_ERR_LENGTH, dx, 6);
        expect_status(bn_backward(NULL, 0, NULL, 0, bn_shape_rows(0, 3), &p, BN_MODE_INFERENCE, NULL, 0, ds, dof),
                      BN_OK, "inference backward of an empty batch");
        CHECK(ds[0] == 0 && dof[2] == 0, "empty inference backward: dscale/doffset not 0");
    }

    /* and the happy path still works after all that */
    expect_status(bn_layer_train(&layer, x, 6, y, 6, sh, ones, zeros), BN_OK, "train");
    CHECK(layer.batches == 1 && bm[2] == 5.0f && bv[2] == 4.0f, "train: batches %llu, bm %g, bv %g",
          (unsigned long long)layer.batches, bm[2], bv[2]);
}

int main(void) {
    printf("C ABI golden vectors (%zu normalize cases, %zu layer cases)\n", N_ELEMS(NORM_CASES), N_ELEMS(LAYER_CASES));
    normalize_cases();
    layer_cases();
    moments_records();
    error_codes();
    printf("%ld checks, %d failed\n", checks, failures);
    if (failures) {
        printf("FAIL\n");
        return 1;
    }
    printf("PASS\n");
    return 0;
}
