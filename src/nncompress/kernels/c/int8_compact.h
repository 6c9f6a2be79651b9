/* Compact kernels of the C export (export/c_source.py): weights stored unpadded as [out][k]
 * int8, biases int32, multipliers as their high 16 bits and shifts as int8, so flash holds
 * little more than the int8 weights. Same integer arithmetic as the packed engine: the
 * accumulator sum((x + 128) * w) + bias (128 + the input zero point folded into the bias at
 * generation) is requantized by nnc_req, so results are equal bit for bit. */

/* y[r][j] = req(sum_i (x[r][i] + 128) * w[j][i] + bias[j]) (the bias holds
 * -(128 + zx) * sum(w), folded at generation; |sum| < 2^31 checked there). With AVX-512
 * VNNI (a -march=native build) one vpdpbusd per 64 weights, else plain C. */
#if defined(NNC_VNNI)
NNC_KERNEL void nnc_dense_c(const int8_t *restrict x, int32_t rows, int32_t k,
                            const int8_t *restrict w, int32_t o, const int32_t *restrict bias,
                            const int16_t *restrict mh, const int8_t *restrict s, int32_t zo,
                            int32_t lo, int32_t hi, int8_t *restrict y) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const int32_t full = k / 64 * 64;
    const __mmask64 tail = k % 64 ? (__mmask64)-1 >> (64 - k % 64) : 0;
    for (int32_t r = 0; r < rows; r++) {
        const int8_t *restrict xr = x + (size_t)r * k;
        for (int32_t j = 0; j < o; j++) {
            const int8_t *restrict wj = w + (size_t)j * k;
            __m512i acc = _mm512_setzero_si512();
            for (int32_t i = 0; i < full; i += 64)
                acc = _mm512_dpbusd_epi32(acc, _mm512_xor_si512(_mm512_loadu_si512(xr + i), flip),
                                          _mm512_loadu_si512(wj + i));
            if (tail)   /* masked-off lanes: x -> 0x80, w -> 0: no contribution */
                acc = _mm512_dpbusd_epi32(acc, _mm512_xor_si512(
                                              _mm512_maskz_loadu_epi8(tail, xr + full), flip),
                                          _mm512_maskz_loadu_epi8(tail, wj + full));
            y[(size_t)r * o + j] = nnc_req((int64_t)_mm512_reduce_add_epi32(acc) + bias[j],
                                           (int32_t)mh[j] * 65536, s[j], zo, lo, hi);
        }
    }
}
#else
NNC_KERNEL void nnc_dense_c(const int8_t *restrict x, int32_t rows, int32_t k,
                            const int8_t *restrict w, int32_t o, const int32_t *restrict bias,
                            const int16_t *restrict mh, const int8_t *restrict s, int32_t zo,
                            int32_t lo, int32_t hi, int8_t *restrict y) {
    for (int32_t r = 0; r < rows; r++) {
        const int8_t *restrict xr = x + (size_t)r * k;
        for (int32_t j = 0; j < o; j++) {
            const int8_t *restrict wj = w + (size_t)j * k;
            int32_t acc = 0;
            for (int32_t i = 0; i < k; i++) acc += ((int32_t)xr[i] + 128) * (int32_t)wj[i];
            y[(size_t)r * o + j] = nnc_req((int64_t)acc + bias[j], (int32_t)mh[j] * 65536,
                                           s[j], zo, lo, hi);
        }
    }
}
#endif

/* y = (x - zp) * scale in float32 (the reference's dequantize, one rounding) */
NNC_INLINE void nnc_dequant(const int8_t *restrict x, float *restrict y, int32_t n,
                            int32_t zp, float scale) {
    for (int32_t i = 0; i < n; i++) y[i] = (float)((int32_t)x[i] - zp) * scale;
}
