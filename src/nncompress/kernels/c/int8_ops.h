/* int8_ops.h: the kernels of nncompress's generated int8 engine (kernels/int8_codegen.py).
 *
 * Integer-arithmetic-only inference after Jacob et al., "Quantization and Training of Neural
 * Networks for Efficient Integer-Arithmetic-Only Inference" (CVPR 2018): int8 x int8 -> int32
 * accumulation, requantization by a fixed-point multiplier and shift exactly as gemmlowp /
 * TensorFlow Lite (MultiplyByQuantizedMultiplier, int64 arithmetic, same rounding), so every
 * kernel equals nncompress.quant.reference bit for bit.
 *
 * Portable C99 (only <stdint.h> and <string.h>); the generator pastes this file into each
 * translation unit and calls the kernels with literal sizes, so gcc specialises and
 * auto-vectorises them (an unsigned x signed byte dot product becomes vpdpbusd with AVX-512
 * VNNI). Dot products run on u = x + 128 (uint8) against int8 weights; the generator folds
 * -(128 + zx) * sum(w) into each output's bias, so padding holds u = zx + 128 (real zero).
 */
#ifndef NNC_INT8_OPS_H
#define NNC_INT8_OPS_H

#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && !defined(NNC_NO_FORCE_INLINE)
#define NNC_INLINE static inline __attribute__((always_inline))
#define NNC_ALIGNED __attribute__((aligned(64)))
#else
#define NNC_INLINE static inline
#define NNC_ALIGNED
#endif

#define NNC_I32_MIN (-2147483647 - 1)
#define NNC_I32_MAX 2147483647

/* MultiplyByQuantizedMultiplier(x, m, s): saturating left shift, SaturatingRoundingDoubling-
 * HighMul, RoundingDivideByPOT (affine.multiply_by_quantized_multiplier). |s| <= 62. */
NNC_INLINE int64_t nnc_mbqm(int64_t x, int32_t m, int32_t s) {
    const int32_t left = s > 0 ? s : 0;
    const int32_t right = s > 0 ? 0 : -s;
    int64_t v = (int64_t)((uint64_t)x << left);
    int64_t ab, hi, mask, rem, thr;
    if (v > NNC_I32_MAX) v = NNC_I32_MAX;
    if (v < NNC_I32_MIN) v = NNC_I32_MIN;
    ab = v * (int64_t)m;
    hi = (ab + (ab >= 0 ? ((int64_t)1 << 30) : 1 - ((int64_t)1 << 30))) / ((int64_t)1 << 31);
    if (v == NNC_I32_MIN && m == NNC_I32_MIN) hi = NNC_I32_MAX;
    mask = ((int64_t)1 << right) - 1;
    rem = hi & mask;
    thr = (mask >> 1) + (hi < 0);
    return (hi >> right) + (rem > thr);
}

/* clamp(zo + mbqm(acc, m, s), lo, hi) as int8 */
NNC_INLINE int8_t nnc_req(int64_t acc, int32_t m, int32_t s, int32_t zo, int32_t lo,
                          int32_t hi) {
    int64_t v = (int64_t)zo + nnc_mbqm(acc, m, s);
    return (int8_t)(v < lo ? lo : (v > hi ? hi : v));
}

/* clamp(rint(v / scale) + zo) in float32, round half to even without <math.h>
 * (|v / scale| is clamped to 2^20 first: the result saturates long before). */
NNC_INLINE int8_t nnc_quantize1(float v, float scale, int32_t zo) {
    float q = v / scale;
    int32_t r;
    if (!(q >= -1048576.0f)) q = -1048576.0f;   /* also NaN, as torch: -> -128 */
    if (q > 1048576.0f) q = 1048576.0f;
    q = (q + 12582912.0f) - 12582912.0f;        /* 1.5 * 2^23: ties to even */
    r = (int32_t)q + zo;
    return (int8_t)(r < -128 ? -128 : (r > 127 ? 127 : r));
}

NNC_INLINE void nnc_quantize(const float *restrict x, int8_t *restrict y, int32_t n,
                             float scale, int32_t zo) {
    for (int32_t i = 0; i < n; i++) y[i] = nnc_quantize1(x[i], scale, zo);
}

/* any elementwise function of one int8 value: y = table[x + 128] */
NNC_INLINE void nnc_lut8(const int8_t *restrict x, int8_t *restrict y, int32_t n,
                         const int8_t *restrict table) {
    for (int32_t i = 0; i < n; i++) y[i] = table[x[i] + 128];
}

NNC_INLINE void nnc_lutf(const int8_t *restrict x, float *restrict y, int32_t n,
                         const float *restrict table) {
    for (int32_t i = 0; i < n; i++) y[i] = table[x[i] + 128];
}

/* rows of k int8 -> rows of kp uint8 (x + 128), the kp - k tail zero */
NNC_INLINE void nnc_to_u8(const int8_t *restrict x, uint8_t *restrict u, int32_t rows,
                          int32_t k, int32_t kp) {
    for (int32_t r = 0; r < rows; r++) {
        for (int32_t i = 0; i < k; i++) u[(int64_t)r * kp + i] = (uint8_t)(x[(int64_t)r * k + i] + 128);
        for (int32_t i = k; i < kp; i++) u[(int64_t)r * kp + i] = 0;
    }
}

/* acc[r * cols + o] = sum_k u[r, k] * w[o, k] (u [rows, kp] uint8, w [cols, kp] int8) */
NNC_INLINE void nnc_gemm(const uint8_t *restrict u, int32_t rows, int32_t kp,
                         const int8_t *restrict w, int32_t cols, int32_t *restrict acc) {
    int32_t r = 0;
    for (; r + 4 <= rows; r += 4) {
        const uint8_t *u0 = u + (int64_t)r * kp, *u1 = u0 + kp, *u2 = u1 + kp, *u3 = u2 + kp;
        for (int32_t o = 0; o < cols; o++) {
            const int8_t *wo = w + (int64_t)o * kp;
            int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
            for (int32_t k = 0; k < kp; k++) {
                const int32_t wk = wo[k];
                a0 += u0[k] * wk; a1 += u1[k] * wk; a2 += u2[k] * wk; a3 += u3[k] * wk;
            }
            acc[(int64_t)r * cols + o] = a0; acc[(int64_t)(r + 1) * cols + o] = a1;
            acc[(int64_t)(r + 2) * cols + o] = a2; acc[(int64_t)(r + 3) * cols + o] = a3;
        }
    }
    for (; r < rows; r++) {
        const uint8_t *ur = u + (int64_t)r * kp;
        int32_t o = 0;
        for (; o + 4 <= cols; o += 4) {
            const int8_t *w0 = w + (int64_t)o * kp, *w1 = w0 + kp, *w2 = w1 + kp, *w3 = w2 + kp;
            int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
            for (int32_t k = 0; k < kp; k++) {
                const int32_t uk = ur[k];
                a0 += uk * w0[k]; a1 += uk * w1[k]; a2 += uk * w2[k]; a3 += uk * w3[k];
            }
            acc[(int64_t)r * cols + o] = a0; acc[(int64_t)r * cols + o + 1] = a1;
            acc[(int64_t)r * cols + o + 2] = a2; acc[(int64_t)r * cols + o + 3] = a3;
        }
        for (; o < cols; o++) {
            const int8_t *wo = w + (int64_t)o * kp;
            int32_t a = 0;
            for (int32_t k = 0; k < kp; k++) a += ur[k] * wo[k];
            acc[(int64_t)r * cols + o] = a;
        }
    }
}

/* y[r * ys_row + o * ys_col] = req(acc[r, o] + bias[o], m[o], s[o]) */
NNC_INLINE void nnc_requant(const int32_t *restrict acc, int32_t rows, int32_t cols,
                            const int64_t *restrict bias, const int32_t *restrict m,
                            const int32_t *restrict s, int32_t zo, int32_t lo, int32_t hi,
                            int8_t *restrict y, int32_t ys_row, int32_t ys_col) {
    for (int32_t r = 0; r < rows; r++)
        for (int32_t o = 0; o < cols; o++)
            y[(int64_t)r * ys_row + (int64_t)o * ys_col] =
                nnc_req((int64_t)acc[(int64_t)r * cols + o] + bias[o], m[o], s[o], zo, lo, hi);
}

/* int8 [c, h, w] -> uint8 [c, h + 2 ph, w + 2 pw] (x + 128), the border = fill */
NNC_INLINE void nnc_pad_u8(const int8_t *restrict x, int32_t c, int32_t h, int32_t w,
                           int32_t ph, int32_t pw, uint8_t fill, uint8_t *restrict xp) {
    const int32_t hp = h + 2 * ph, wp = w + 2 * pw;
    if (ph > 0 || pw > 0) memset(xp, fill, (size_t)c * hp * wp);
    for (int32_t ci = 0; ci < c; ci++)
        for (int32_t i = 0; i < h; i++)
            for (int32_t j = 0; j < w; j++)
                xp[((int64_t)ci * hp + i + ph) * wp + j + pw] =
                    (uint8_t)(x[((int64_t)ci * h + i) * w + j] + 128);
}

/* one group's im2col rows [oh * ow, kp]: (c, ky, kx) order, the kp tail zero */
NNC_INLINE void nnc_im2col(const uint8_t *restrict xp, int32_t hp, int32_t wp, int32_t c0,
                           int32_t cg, int32_t kh, int32_t kw, int32_t sh, int32_t sw,
                           int32_t dh, int32_t dw, int32_t oh, int32_t ow, int32_t kp,
                           uint8_t *restrict u) {
    for (int32_t oy = 0; oy < oh; oy++)
        for (int32_t ox = 0; ox < ow; ox++) {
            uint8_t *row = u + ((int64_t)oy * ow + ox) * kp;
            int32_t idx = 0;
            for (int32_t ci = c0; ci < c0 + cg; ci++)
                for (int32_t ky = 0; ky < kh; ky++)
                    for (int32_t kx = 0; kx < kw; kx++)
                        row[idx++] = xp[((int64_t)ci * hp + oy * sh + ky * dh) * wp
                                        + ox * sw + kx * dw];
            for (; idx < kp; idx++) row[idx] = 0;
        }
}

/* direct convolution over a padded uint8 input (small groups: depthwise, first layers):
 * acc[oy * ow + ox] = sum_{c in group, ky, kx} w[o, c, ky, kx] * xp[c, oy sh + ky dh, ...] */
NNC_INLINE void nnc_conv_direct(const uint8_t *restrict xp, int32_t hp, int32_t wp,
                                int32_t cg, int32_t og, const int8_t *restrict w,
                                int32_t o_n, int32_t kh, int32_t kw, int32_t sh, int32_t sw,
                                int32_t dh, int32_t dw, int32_t oh, int32_t ow,
                                const int64_t *restrict bias, const int32_t *restrict m,
                                const int32_t *restrict s, int32_t zo, int32_t lo, int32_t hi,
                                int32_t *restrict acc, int8_t *restrict y) {
    const int32_t p = oh * ow;
    for (int32_t o = 0; o < o_n; o++) {
        const int32_t c0 = (o / og) * cg;
        for (int32_t i = 0; i < p; i++) acc[i] = 0;
        for (int32_t ci = 0; ci < cg; ci++)
            for (int32_t ky = 0; ky < kh; ky++)
                for (int32_t kx = 0; kx < kw; kx++) {
                    const int32_t wv = w[(((int64_t)o * cg + ci) * kh + ky) * kw + kx];
                    const uint8_t *base = xp + ((int64_t)(c0 + ci) * hp + ky * dh) * wp + kx * dw;
                    for (int32_t oy = 0; oy < oh; oy++)
                        for (int32_t ox = 0; ox < ow; ox++)
                            acc[oy * ow + ox] += wv * base[(int64_t)oy * sh * wp + ox * sw];
                }
        for (int32_t i = 0; i < p; i++)
            y[(int64_t)o * p + i] = nnc_req((int64_t)acc[i] + bias[o], m[o], s[o], zo, lo, hi);
    }
}

/* max pooling over [c, h, w] (padding never wins) */
NNC_INLINE void nnc_maxpool(const int8_t *restrict x, int32_t c, int32_t h, int32_t w,
                            int32_t kh, int32_t kw, int32_t sh, int32_t sw, int32_t ph,
                            int32_t pw, int32_t oh, int32_t ow, int8_t *restrict y) {
    for (int32_t ci = 0; ci < c; ci++)
        for (int32_t oy = 0; oy < oh; oy++)
            for (int32_t ox = 0; ox < ow; ox++) {
                int32_t best = -129;
                for (int32_t ky = 0; ky < kh; ky++) {
                    const int32_t iy = oy * sh + ky - ph;
                    if (iy < 0 || iy >= h) continue;
                    for (int32_t kx = 0; kx < kw; kx++) {
                        const int32_t ix = ox * sw + kx - pw;
                        int32_t v;
                        if (ix < 0 || ix >= w) continue;
                        v = x[((int64_t)ci * h + iy) * w + ix];
                        best = v > best ? v : best;
                    }
                }
                y[((int64_t)ci * oh + oy) * ow + ox] = (int8_t)best;
            }
}

/* average pooling, the count including padding: req(sum (x - zx), m, s) */
NNC_INLINE void nnc_avgpool(const int8_t *restrict x, int32_t c, int32_t h, int32_t w,
                            int32_t kh, int32_t kw, int32_t sh, int32_t sw, int32_t ph,
                            int32_t pw, int32_t oh, int32_t ow, int32_t zx, int32_t m,
                            int32_t s, int32_t zo, int32_t lo, int32_t hi, int8_t *restrict y) {
    for (int32_t ci = 0; ci < c; ci++)
        for (int32_t oy = 0; oy < oh; oy++)
            for (int32_t ox = 0; ox < ow; ox++) {
                int64_t sum = 0;
                for (int32_t ky = 0; ky < kh; ky++) {
                    const int32_t iy = oy * sh + ky - ph;
                    if (iy < 0 || iy >= h) continue;
                    for (int32_t kx = 0; kx < kw; kx++) {
                        const int32_t ix = ox * sw + kx - pw;
                        if (ix < 0 || ix >= w) continue;
                        sum += x[((int64_t)ci * h + iy) * w + ix] - zx;
                    }
                }
                y[((int64_t)ci * oh + oy) * ow + ox] = nnc_req(sum, m, s, zo, lo, hi);
            }
}

/* y[o] = req(sum_r (x[kept[o] + red[r]] - zx), m, s) */
NNC_INLINE void nnc_mean(const int8_t *restrict x, const int32_t *restrict kept, int32_t nk,
                         const int32_t *restrict red, int32_t nr, int32_t zx, int32_t m,
                         int32_t s, int32_t zo, int32_t lo, int32_t hi, int8_t *restrict y) {
    for (int32_t o = 0; o < nk; o++) {
        int64_t sum = 0;
        for (int32_t r = 0; r < nr; r++) sum += x[kept[o] + red[r]] - zx;
        y[o] = nnc_req(sum, m, s, zo, lo, hi);
    }
}

/* one int8 matrix product [mm, kk] @ [kk, nn] -> req(sum (a - za)(b - zb), m, s) [mm, nn];
 * scratch: (mm + nn) * kk int16 (a - za, and b - zb transposed) */
NNC_INLINE void nnc_matmul(const int8_t *restrict a, int32_t za, const int8_t *restrict b,
                           int32_t zb, int32_t mm, int32_t kk, int32_t nn, int32_t m, int32_t s,
                           int32_t zo, int32_t lo, int32_t hi, int16_t *restrict scratch,
                           int8_t *restrict y) {
    int16_t *at = scratch, *bt = scratch + (int64_t)mm * kk;
    for (int32_t i = 0; i < mm * kk; i++) at[i] = (int16_t)(a[i] - za);
    for (int32_t k = 0; k < kk; k++)
        for (int32_t j = 0; j < nn; j++) bt[(int64_t)j * kk + k] = (int16_t)(b[(int64_t)k * nn + j] - zb);
    for (int32_t i = 0; i < mm; i++)
        for (int32_t j = 0; j < nn; j++) {
            int32_t acc = 0;
            for (int32_t k = 0; k < kk; k++) acc += at[(int64_t)i * kk + k] * bt[(int64_t)j * kk + k];
            y[(int64_t)i * nn + j] = nnc_req(acc, m, s, zo, lo, hi);
        }
}

/* TensorFlow Lite's int8 add: ta / tb = mbqm((x - z) * 2^20, ...) precomputed per value */
NNC_INLINE void nnc_add(const int8_t *restrict a, const int8_t *restrict b, int32_t n,
                        const int32_t *restrict ta, const int32_t *restrict tb, int32_t m,
                        int32_t s, int32_t zo, int32_t lo, int32_t hi, int8_t *restrict y) {
    for (int32_t i = 0; i < n; i++)
        y[i] = nnc_req((int64_t)ta[a[i] + 128] + tb[b[i] + 128], m, s, zo, lo, hi);
}

NNC_INLINE void nnc_mul(const int8_t *restrict a, const int8_t *restrict b, int32_t n,
                        int32_t za, int32_t zb, int32_t m, int32_t s, int32_t zo, int32_t lo,
                        int32_t hi, int8_t *restrict y) {
    for (int32_t i = 0; i < n; i++)
        y[i] = nnc_req((int64_t)(a[i] - za) * (b[i] - zb), m, s, zo, lo, hi);
}

/* concatenation: rows of `chunk` values, each through its rescaling table, into rows of
 * `total` at column `offset` */
NNC_INLINE void nnc_concat_part(const int8_t *restrict x, int32_t outer, int32_t chunk,
                                const int8_t *restrict table, int32_t total, int32_t offset,
                                int8_t *restrict y) {
    for (int32_t i = 0; i < outer; i++)
        for (int32_t j = 0; j < chunk; j++)
            y[(int64_t)i * total + offset + j] = table[x[(int64_t)i * chunk + j] + 128];
}

/* rows of ids -> rows of an int8 table [n, d]; 1 when an id is out of range */
NNC_INLINE int nnc_embedding(const int64_t *restrict ids, int32_t count,
                             const int8_t *restrict table, int64_t n, int32_t d,
                             int8_t *restrict y) {
    for (int32_t i = 0; i < count; i++) {
        int64_t id = ids[i];
        if (id < 0) id += n;
        if (id < 0 || id >= n) return 1;
        memcpy(y + (int64_t)i * d, table + id * d, (size_t)d);
    }
    return 0;
}

#endif /* NNC_INT8_OPS_H */
