/* int8_binary.h: binary layers in nncompress's generated int8 engine (kernels/int8_emit_binary.py).
 *
 * Courbariaux, Hubara, Soudry, El-Yaniv & Bengio (2016), "Binarized neural networks";
 * Rastegari, Ordonez, Redmon & Farhadi (2016), "XNOR-Net". A linear / conv op whose int8
 * weights are all +-1 keeps them at 1 bit each: uint32 words, bit i of word j of an output's
 * row holding weight 32 j + i, a set bit meaning -1; the row's tail bits are clear. Its dot
 * products, exactly the int8 ones of nncompress.quant.reference:
 *
 *   - input from a sign op (+-1, zero-point 0): the input rows packed alike, then
 *     dot = k - 2 popcount(x XOR w) (clear tail bits XOR to 0); a convolution's padding holds
 *     0, so its rows carry a mask of the positions inside the input:
 *     dot = popcount(mask) - 2 popcount((x XOR w) AND mask);
 *   - any other int8 input, as u = x + 128 (uint8, the int8 engine's operand; padding holds
 *     zx + 128): sum_k u_k w_k with each weight word unpacked to +-1 once per call (equal to
 *     sum(u) - 2 sum_{bit set} u_k), the -(128 + zx) sum(w) term folded into the bias at
 *     generation as for int8 weights.
 *
 * Then the int8 engine's requantization (nnc_requant). Portable C99 after int8_ops.h (its
 * macros); popcount is __builtin_popcount under gcc / clang, else (or with
 * -DNNC_NO_BUILTIN_POPCOUNT) a bit-twiddling count.
 */
#ifndef NNC_INT8_BINARY_H
#define NNC_INT8_BINARY_H

NNC_INLINE int32_t nnc_popcount32(uint32_t v) {
#if defined(__GNUC__) && !defined(NNC_NO_BUILTIN_POPCOUNT)
    return __builtin_popcount(v);
#else
    v = v - ((v >> 1) & 0x55555555u);
    v = (v & 0x33333333u) + ((v >> 2) & 0x33333333u);
    v = (v + (v >> 4)) & 0x0F0F0F0Fu;
    return (int32_t)((v * 0x01010101u) >> 24);
#endif
}

/* y = x >= t[ci] ? 1 : -1 over [outer, c, inner] (the sign op; ties give +1) */
NNC_KERNEL void nnc_sign(const int8_t *restrict x, int8_t *restrict y, int32_t outer, int32_t c,
                         int32_t inner, const int16_t *restrict t) {
    for (int32_t o = 0; o < outer; o++)
        for (int32_t ci = 0; ci < c; ci++) {
            const int64_t base = ((int64_t)o * c + ci) * inner;
            const int32_t thr = t[ci];
            for (int32_t i = 0; i < inner; i++)
                y[base + i] = (int8_t)(x[base + i] >= thr ? 1 : -1);
        }
}

/* rows of k int8 +-1 values -> rows of `words` uint32 sign bits (set: negative) */
NNC_KERNEL void nnc_pack_signs(const int8_t *restrict x, int32_t rows, int32_t k, int32_t words,
                               uint32_t *restrict bits) {
    for (int32_t r = 0; r < rows; r++) {
        const int8_t *xr = x + (int64_t)r * k;
        uint32_t *br = bits + (int64_t)r * words;
        for (int32_t j = 0; j < words; j++) {
            const int32_t n = k - 32 * j < 32 ? k - 32 * j : 32;
            uint32_t word = 0;
            for (int32_t i = 0; i < n; i++) word |= (uint32_t)(xr[32 * j + i] < 0) << i;
            br[j] = word;
        }
    }
}

/* acc[r * cols + o] = k - 2 popcount(x_r XOR w_o): the dot product of two +-1 rows */
NNC_KERNEL void nnc_xnor_gemm(const uint32_t *restrict xb, int32_t rows, int32_t words,
                              int32_t k, const uint32_t *restrict wb, int32_t cols,
                              int32_t *restrict acc) {
    for (int32_t r = 0; r < rows; r++) {
        const uint32_t *xr = xb + (int64_t)r * words;
        for (int32_t o = 0; o < cols; o++) {
            const uint32_t *wr = wb + (int64_t)o * words;
            int32_t diff = 0;
            for (int32_t j = 0; j < words; j++) diff += nnc_popcount32(xr[j] ^ wr[j]);
            acc[(int64_t)r * cols + o] = k - 2 * diff;
        }
    }
}

/* the bit rows of one group of a convolution over +-1 input x [c, h, w]: per output position,
 * the sign bits of its receptive field in (channel, ky, kx) order and a mask whose bits are set
 * where the position lies inside the input (the zero padding contributes nothing) */
NNC_KERNEL void nnc_xnor_im2col(const int8_t *restrict x, int32_t c0, int32_t cg, int32_t h,
                                int32_t w, int32_t ph, int32_t pw, int32_t kh, int32_t kw,
                                int32_t sh, int32_t sw, int32_t dh, int32_t dw, int32_t oh,
                                int32_t ow, int32_t words, uint32_t *restrict bits,
                                uint32_t *restrict mask) {
    for (int32_t oy = 0; oy < oh; oy++)
        for (int32_t ox = 0; ox < ow; ox++) {
            const int64_t row = ((int64_t)oy * ow + ox) * words;
            int32_t idx = 0;
            for (int32_t j = 0; j < words; j++) bits[row + j] = mask[row + j] = 0;
            for (int32_t ci = c0; ci < c0 + cg; ci++)
                for (int32_t ky = 0; ky < kh; ky++) {
                    const int32_t iy = oy * sh + ky * dh - ph;
                    for (int32_t kx = 0; kx < kw; kx++, idx++) {
                        const int32_t ix = ox * sw + kx * dw - pw;
                        const uint32_t bit = (uint32_t)1 << (idx & 31);
                        if (iy < 0 || iy >= h || ix < 0 || ix >= w) continue;
                        mask[row + (idx >> 5)] |= bit;
                        if (x[((int64_t)ci * h + iy) * w + ix] < 0) bits[row + (idx >> 5)] |= bit;
                    }
                }
        }
}

/* acc[r * cols + o] = popcount(mask_r) - 2 popcount((x_r XOR w_o) AND mask_r) */
NNC_KERNEL void nnc_xnor_gemm_masked(const uint32_t *restrict xb, const uint32_t *restrict mb,
                                     int32_t rows, int32_t words, const uint32_t *restrict wb,
                                     int32_t cols, int32_t *restrict acc) {
    for (int32_t r = 0; r < rows; r++) {
        const uint32_t *xr = xb + (int64_t)r * words, *mr = mb + (int64_t)r * words;
        int32_t valid = 0;
        for (int32_t j = 0; j < words; j++) valid += nnc_popcount32(mr[j]);
        for (int32_t o = 0; o < cols; o++) {
            const uint32_t *wr = wb + (int64_t)o * words;
            int32_t diff = 0;
            for (int32_t j = 0; j < words; j++) diff += nnc_popcount32((xr[j] ^ wr[j]) & mr[j]);
            acc[(int64_t)r * cols + o] = valid - 2 * diff;
        }
    }
}

/* acc[r * cols + o] = sum_i u[r, i] w[o, i] for rows of k uint8 u and +-1 weights w from
 * bits: each 32-bit word is unpacked once to int8 +-1 and used for every row (a product the
 * compiler vectorises, as the int8 kernels) */
NNC_KERNEL void nnc_bgemm(const uint8_t *restrict u, int32_t rows, int32_t k,
                          const uint32_t *restrict wb, int32_t words, int32_t cols,
                          int32_t *restrict acc) {
    int8_t s[32];
    for (int32_t o = 0; o < cols; o++) {
        for (int32_t r = 0; r < rows; r++) acc[(int64_t)r * cols + o] = 0;
        for (int32_t j = 0; j < words; j++) {
            const uint32_t word = wb[(int64_t)o * words + j];
            const int32_t n = k - 32 * j < 32 ? k - 32 * j : 32;
            for (int32_t i = 0; i < 32; i++) s[i] = (int8_t)(1 - 2 * (int32_t)((word >> i) & 1u));
            for (int32_t r = 0; r < rows; r++) {
                const uint8_t *ur = u + (int64_t)r * k + 32 * j;
                int32_t sum = 0;
                for (int32_t i = 0; i < n; i++) sum += ur[i] * s[i];
                acc[(int64_t)r * cols + o] += sum;
            }
        }
    }
}

#endif /* NNC_INT8_BINARY_H */
