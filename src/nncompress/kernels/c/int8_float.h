/* int8_float.h: the `float` ops of an nncompress integer program (layer norm, softmax), for
 * programs that have them (the only part of the generated engine that needs <math.h>).
 *
 * Computed in double on the dequantized int8 input and quantized to the output's int8 type
 * as nncompress.quant.reference does in float32; the two can differ only where the float32
 * result lies within rounding error of a half step, by at most 1 in the int8 output.
 */
#ifndef NNC_INT8_FLOAT_H
#define NNC_INT8_FLOAT_H

#include <math.h>

/* Ba, Kiros & Hinton (2016) layer normalisation over rows of n values (w, b: n or NULL) */
NNC_INLINE void nnc_layer_norm(const float *restrict x, int32_t rows, int32_t n,
                               const float *w, const float *b, double eps, float so,
                               int32_t zo, int8_t *restrict y) {
    for (int32_t r = 0; r < rows; r++) {
        const float *xr = x + (int64_t)r * n;
        double mean = 0.0, var = 0.0, inv;
        for (int32_t i = 0; i < n; i++) mean += xr[i];
        mean /= n;
        for (int32_t i = 0; i < n; i++) var += (xr[i] - mean) * (xr[i] - mean);
        inv = 1.0 / sqrt(var / n + eps);
        for (int32_t i = 0; i < n; i++) {
            double v = (xr[i] - mean) * inv;
            if (w) v *= w[i];
            if (b) v += b[i];
            y[(int64_t)r * n + i] = nnc_quantize1((float)v, so, zo);
        }
    }
}

/* softmax over the middle axis of [outer, n, inner] */
NNC_INLINE void nnc_softmax(const float *restrict x, int32_t outer, int32_t n, int32_t inner,
                            float so, int32_t zo, int8_t *restrict y) {
    for (int32_t o = 0; o < outer; o++)
        for (int32_t j = 0; j < inner; j++) {
            const float *xr = x + (int64_t)o * n * inner + j;
            double top = xr[0], sum = 0.0;
            for (int32_t i = 1; i < n; i++) top = xr[(int64_t)i * inner] > top ? xr[(int64_t)i * inner] : top;
            for (int32_t i = 0; i < n; i++) sum += exp(xr[(int64_t)i * inner] - top);
            for (int32_t i = 0; i < n; i++)
                y[(int64_t)o * n * inner + (int64_t)i * inner + j] =
                    nnc_quantize1((float)(exp(xr[(int64_t)i * inner] - top) / sum), so, zo);
        }
}

#endif /* NNC_INT8_FLOAT_H */
