/* int8_float.h: the `float` ops of an nncompress integer program (layer norm, softmax), for
 * programs that have them (the only part of the generated engine that needs <math.h>).
 *
 * Computed in double (softmax from a table of the 256 values exp(x_i - max) can take) and
 * quantized to the output's int8 type as nncompress.quant.reference does in float32; the two
 * can differ only where the float32 result lies within rounding error of a half step, by at
 * most 1 in the int8 output.
 */
#ifndef NNC_INT8_FLOAT_H
#define NNC_INT8_FLOAT_H

#include <math.h>

/* Ba, Kiros & Hinton (2016) layer normalisation over rows of n int8 values (real = sx (q - zx)):
 * mean and variance from exact integer sums, the rest in double; w, b: n each */
NNC_INLINE void nnc_layer_norm(const int8_t *restrict x, int32_t rows, int32_t n, int32_t zx,
                               double sx, const float *restrict w, const float *restrict b,
                               double eps, float so, int32_t zo, int8_t *restrict y) {
    for (int32_t r = 0; r < rows; r++) {
        const int8_t *xr = x + (int64_t)r * n;
        int8_t *yr = y + (int64_t)r * n;
        int64_t s1 = 0, s2 = 0;
        for (int32_t i = 0; i < n; i++) {
            const int32_t d = xr[i] - zx;
            s1 += d;
            s2 += d * d;
        }
        {
            const double mean = (double)s1 / n;
            const double var = sx * sx * (double)((int64_t)n * s2 - s1 * s1) / ((double)n * n);
            const double scale = sx / sqrt(var + eps);
            for (int32_t i = 0; i < n; i++)
                yr[i] = nnc_quantize1((float)(((xr[i] - zx) - mean) * scale * w[i] + b[i]), so,
                                      zo);
        }
    }
}

/* softmax over the middle axis of int8 [outer, n, inner]: exp(x_i - max) is etab[q_max - q_i]
 * (the input's 256 possible differences, exp computed at generation in double) */
NNC_INLINE void nnc_softmax(const int8_t *restrict x, int32_t outer, int32_t n, int32_t inner,
                            const double *restrict etab, float so, int32_t zo,
                            int8_t *restrict y) {
    for (int32_t o = 0; o < outer; o++)
        for (int32_t j = 0; j < inner; j++) {
            const int8_t *xr = x + (int64_t)o * n * inner + j;
            int8_t *yr = y + (int64_t)o * n * inner + j;
            int32_t top = xr[0];
            double sum = 0.0;
            for (int32_t i = 1; i < n; i++) top = xr[(int64_t)i * inner] > top ? xr[(int64_t)i * inner] : top;
            for (int32_t i = 0; i < n; i++) sum += etab[top - xr[(int64_t)i * inner]];
            for (int32_t i = 0; i < n; i++)
                yr[(int64_t)i * inner] = nnc_quantize1((float)(etab[top - xr[(int64_t)i * inner]] / sum), so, zo);
        }
}

#endif /* NNC_INT8_FLOAT_H */
