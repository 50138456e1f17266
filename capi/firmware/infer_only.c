/*
 * The smallest useful image: a frozen layer (moving statistics in flash)
 * run in inference through bn_layer_infer, for the library's footprint in
 * an inference-only firmware (.ci/capi prints it). Checks one value.
 */
#include <math.h>
#include <stdint.h>

#include "batchnorm.h"
#include "firmware.h"

#define C 4
static const float moving_mean[C] = {0.5f, -1.0f, 2.0f, 0.0f};
static const float moving_variance[C] = {1.0f, 4.0f, 0.25f, 9.0f};
static const float scale[C] = {1.0f, 2.0f, 0.5f, 1.0f};
static const float offset[C] = {0.0f, 1.0f, -1.0f, 0.5f};
static float x[16 * C], y[16 * C];

int main(void) {
    /* Inference only reads the moving statistics: const data is fine. */
    bn_layer layer = {
        .config = bn_config_keras(),
        .channels = C,
        .moving_mean = (float *)moving_mean,
        .moving_variance = (float *)moving_variance,
    };
    for (int i = 0; i < 16 * C; i++) x[i] = (float)(i % 7) - 3.0f;
    bn_status st = bn_layer_infer(&layer, x, 16 * C, y, 16 * C, bn_shape_rows(16, C), scale, offset);
    /* y[1] = (x[1] - (-1)) / sqrt(4 + 1e-3) * 2 + 1, x[1] = -2 */
    float want = (-2.0f + 1.0f) / sqrtf(4.001f) * 2.0f + 1.0f;
    int failed = st != BN_OK || fabsf(y[1] - want) > 1e-6f;
    fw_puts(failed ? "infer-only image: FAIL\n" : "infer-only image: PASS\n");
    return failed;
}
