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

/* The AVX-512 VNNI fast path (gcc -march=native on a CPU with it); every kernel has a
 * portable C version, used otherwise (e.g. -O2 without -march, a microcontroller). */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__) && defined(__AVX512VNNI__) && !defined(NNC_PORTABLE)
#define NNC_VNNI 1
#include <immintrin.h>
#endif

#if defined(__GNUC__) && !defined(NNC_NO_FORCE_INLINE)
#define NNC_INLINE static inline __attribute__((always_inline))
#define NNC_NOINLINE __attribute__((noinline))
#define NNC_ALIGNED __attribute__((aligned(64)))
#else
#define NNC_INLINE static inline
#define NNC_NOINLINE
#define NNC_ALIGNED
#endif

/* The loop kernels (dot products, convolutions, pools, matmul, recurrent layers): one
 * compiled copy each by default (compile time linear in the program); with
 * -DNNC_SPECIALISE_KERNELS, inlined at every call with its literal sizes. */
#if defined(__GNUC__)
#define NNC_UNUSED __attribute__((unused))
#else
#define NNC_UNUSED
#endif
#ifdef NNC_SPECIALISE_KERNELS
#define NNC_KERNEL NNC_INLINE
#else
#define NNC_KERNEL static NNC_UNUSED NNC_NOINLINE
#endif

/* gcc 12 reports a false "iteration N invokes undefined behavior" in cloned dot-product
 * tails (checked under -fsanitize=address,undefined); it is not a -Wall warning. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Waggressive-loop-optimizations"
#endif

#define NNC_I32_MIN (-2147483647 - 1)
#define NNC_I32_MAX 2147483647

/* RoundingDivideByPOT: x / 2^n rounded to nearest, ties away from zero (0 <= n <= 62) */
NNC_INLINE int64_t nnc_rdpot(int64_t x, int32_t n) {
    const int64_t mask = ((int64_t)1 << n) - 1;
    return (x >> n) + ((x & mask) > (mask >> 1) + (x < 0));
}

/* MultiplyByQuantizedMultiplier(x, m, s): saturating left shift, SaturatingRoundingDoubling-
 * HighMul, RoundingDivideByPOT (affine.multiply_by_quantized_multiplier). |s| <= 62. */
NNC_INLINE int64_t nnc_mbqm(int64_t x, int32_t m, int32_t s) {
    const int32_t left = s > 0 ? s : 0;
    int64_t v = (int64_t)((uint64_t)x << left);
    int64_t ab, hi;
    if (v > NNC_I32_MAX) v = NNC_I32_MAX;
    if (v < NNC_I32_MIN) v = NNC_I32_MIN;
    ab = v * (int64_t)m;
    hi = (ab + (ab >= 0 ? ((int64_t)1 << 30) : 1 - ((int64_t)1 << 30))) / ((int64_t)1 << 31);
    if (v == NNC_I32_MIN && m == NNC_I32_MIN) hi = NNC_I32_MAX;
    return nnc_rdpot(hi, s > 0 ? 0 : -s);
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

/* Dot products. Weights are packed [cols16 / 16][kp / 4][16][4]: for each block of 16
 * outputs, each group of 4 inputs is 64 contiguous bytes (output-major, 4 inputs each),
 * so one AVX-512 VNNI vpdpbusd adds 4 products to 16 outputs; kp is a multiple of 4 and
 * cols16 of 16, both zero-padded.
 * acc[r * cols16 + o] = sum_k u[r * kp + k] * w[o, k]. */
#ifdef NNC_VNNI
#define NNC_DP(a, x, w) a = _mm512_dpbusd_epi32(a, x, w)
static inline __m512i nnc_bcast4(const uint8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}
NNC_KERNEL void nnc_gemm(const uint8_t *restrict u, int32_t rows, int32_t kp,
                         const int8_t *restrict w, int32_t cols16, int32_t *restrict acc) {
    const int32_t k4 = kp / 4, nblk = cols16 / 16;
    const int64_t bs = (int64_t)k4 * 64;             /* bytes of one block of 16 outputs */
    int32_t r = 0;
    for (; r + 4 <= rows; r += 4) {                  /* 4 rows x 2 blocks: 8 accumulators */
        const uint8_t *u0 = u + (int64_t)r * kp, *u1 = u0 + kp, *u2 = u1 + kp, *u3 = u2 + kp;
        int32_t c = 0;
        for (; c + 2 <= nblk; c += 2) {
            const int8_t *w0 = w + c * bs, *w1 = w0 + bs;
            __m512i a00 = _mm512_setzero_si512(), a01 = a00, a10 = a00, a11 = a00,
                    a20 = a00, a21 = a00, a30 = a00, a31 = a00;
            for (int32_t k = 0; k < k4; k++) {
                const __m512i b0 = _mm512_loadu_si512(w0 + k * 64);
                const __m512i b1 = _mm512_loadu_si512(w1 + k * 64);
                __m512i x = nnc_bcast4(u0 + 4 * k);
                NNC_DP(a00, x, b0); NNC_DP(a01, x, b1);
                x = nnc_bcast4(u1 + 4 * k); NNC_DP(a10, x, b0); NNC_DP(a11, x, b1);
                x = nnc_bcast4(u2 + 4 * k); NNC_DP(a20, x, b0); NNC_DP(a21, x, b1);
                x = nnc_bcast4(u3 + 4 * k); NNC_DP(a30, x, b0); NNC_DP(a31, x, b1);
            }
            int32_t *o = acc + (int64_t)r * cols16 + c * 16;
            _mm512_storeu_si512(o, a00); _mm512_storeu_si512(o + 16, a01); o += cols16;
            _mm512_storeu_si512(o, a10); _mm512_storeu_si512(o + 16, a11); o += cols16;
            _mm512_storeu_si512(o, a20); _mm512_storeu_si512(o + 16, a21); o += cols16;
            _mm512_storeu_si512(o, a30); _mm512_storeu_si512(o + 16, a31);
        }
        for (; c < nblk; c++) {
            const int8_t *w0 = w + c * bs;
            __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
            for (int32_t k = 0; k < k4; k++) {
                const __m512i b0 = _mm512_loadu_si512(w0 + k * 64);
                NNC_DP(a0, nnc_bcast4(u0 + 4 * k), b0); NNC_DP(a1, nnc_bcast4(u1 + 4 * k), b0);
                NNC_DP(a2, nnc_bcast4(u2 + 4 * k), b0); NNC_DP(a3, nnc_bcast4(u3 + 4 * k), b0);
            }
            int32_t *o = acc + (int64_t)r * cols16 + c * 16;
            _mm512_storeu_si512(o, a0); _mm512_storeu_si512(o + cols16, a1);
            _mm512_storeu_si512(o + 2 * cols16, a2); _mm512_storeu_si512(o + 3 * cols16, a3);
        }
    }
    for (; r < rows; r++) {                          /* 1 row x 4 blocks */
        const uint8_t *u0 = u + (int64_t)r * kp;
        int32_t c = 0;
        for (; c + 4 <= nblk; c += 4) {
            const int8_t *w0 = w + c * bs, *w1 = w0 + bs, *w2 = w1 + bs, *w3 = w2 + bs;
            __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
            for (int32_t k = 0; k < k4; k++) {
                const __m512i x = nnc_bcast4(u0 + 4 * k);
                NNC_DP(a0, x, _mm512_loadu_si512(w0 + k * 64));
                NNC_DP(a1, x, _mm512_loadu_si512(w1 + k * 64));
                NNC_DP(a2, x, _mm512_loadu_si512(w2 + k * 64));
                NNC_DP(a3, x, _mm512_loadu_si512(w3 + k * 64));
            }
            int32_t *o = acc + (int64_t)r * cols16 + c * 16;
            _mm512_storeu_si512(o, a0); _mm512_storeu_si512(o + 16, a1);
            _mm512_storeu_si512(o + 32, a2); _mm512_storeu_si512(o + 48, a3);
        }
        for (; c < nblk; c++) {
            const int8_t *w0 = w + c * bs;
            __m512i a0 = _mm512_setzero_si512();
            for (int32_t k = 0; k < k4; k++)
                NNC_DP(a0, nnc_bcast4(u0 + 4 * k), _mm512_loadu_si512(w0 + k * 64));
            _mm512_storeu_si512(acc + (int64_t)r * cols16 + c * 16, a0);
        }
    }
}
#else
NNC_KERNEL void nnc_gemm(const uint8_t *restrict u, int32_t rows, int32_t kp,
                         const int8_t *restrict w, int32_t cols16, int32_t *restrict acc) {
    const int32_t k4 = kp / 4, nblk = cols16 / 16;
    for (int32_t r = 0; r < rows; r++)
        for (int32_t c = 0; c < nblk; c++) {
            const int8_t *wb = w + (int64_t)c * k4 * 64;
            const uint8_t *ur = u + (int64_t)r * kp;
            int32_t a[16] = {0};
            for (int32_t k = 0; k < k4; k++)
                for (int32_t o = 0; o < 16; o++) {
                    const int8_t *wk = wb + (int64_t)k * 64 + o * 4;
                    a[o] += ur[4 * k] * wk[0] + ur[4 * k + 1] * wk[1] + ur[4 * k + 2] * wk[2]
                            + ur[4 * k + 3] * wk[3];
                }
            memcpy(acc + (int64_t)r * cols16 + c * 16, a, sizeof a);
        }
}
#endif

#ifdef NNC_VNNI
/* nnc_mbqm on 8 int64 lanes (m, s: int32 held in int64 lanes) */
static inline __m512i nnc_mbqm8(__m512i x, __m512i m, __m512i s) {
    const __m512i zero = _mm512_setzero_si512();
    const __m512i imin = _mm512_set1_epi64(NNC_I32_MIN), imax = _mm512_set1_epi64(NNC_I32_MAX);
    const __m512i right = _mm512_max_epi64(_mm512_sub_epi64(zero, s), zero);
    __m512i v = _mm512_sllv_epi64(x, _mm512_max_epi64(s, zero));
    __m512i ab, hi, mask, thr;
    __mmask8 sat;
    v = _mm512_min_epi64(_mm512_max_epi64(v, imin), imax);
    ab = _mm512_mul_epi32(v, m);
    ab = _mm512_add_epi64(ab, _mm512_mask_blend_epi64(_mm512_cmplt_epi64_mask(ab, zero),
        _mm512_set1_epi64((int64_t)1 << 30), _mm512_set1_epi64(1 - ((int64_t)1 << 30))));
    ab = _mm512_mask_add_epi64(ab, _mm512_cmplt_epi64_mask(ab, zero), ab,
                               _mm512_set1_epi64(NNC_I32_MAX));
    hi = _mm512_srai_epi64(ab, 31);
    sat = _mm512_cmpeq_epi64_mask(v, imin) & _mm512_cmpeq_epi64_mask(m, imin);
    hi = _mm512_mask_mov_epi64(hi, sat, imax);
    mask = _mm512_sub_epi64(_mm512_sllv_epi64(_mm512_set1_epi64(1), right), _mm512_set1_epi64(1));
    thr = _mm512_add_epi64(_mm512_srai_epi64(mask, 1),
                           _mm512_maskz_mov_epi64(_mm512_cmplt_epi64_mask(hi, zero),
                                                  _mm512_set1_epi64(1)));
    return _mm512_add_epi64(_mm512_srav_epi64(hi, right),
        _mm512_maskz_mov_epi64(_mm512_cmpgt_epi64_mask(_mm512_and_si512(hi, mask), thr),
                               _mm512_set1_epi64(1)));
}

/* nnc_mbqm8 where the generator proved x in int32, s <= 0 and 0 <= m < 2^31: no left shift,
 * no saturation (the same result, fewer instructions) */
static inline __m512i nnc_mbqm8_fast(__m512i x, __m512i m, __m512i s) {
    const __m512i zero = _mm512_setzero_si512(), one = _mm512_set1_epi64(1);
    const __m512i right = _mm512_sub_epi64(zero, s);
    __m512i ab = _mm512_mul_epi32(x, m), hi, mask, thr;
    ab = _mm512_add_epi64(ab, _mm512_mask_blend_epi64(_mm512_cmplt_epi64_mask(ab, zero),
        _mm512_set1_epi64((int64_t)1 << 30), _mm512_set1_epi64(1 - ((int64_t)1 << 30))));
    ab = _mm512_mask_add_epi64(ab, _mm512_cmplt_epi64_mask(ab, zero), ab,
                               _mm512_set1_epi64(NNC_I32_MAX));
    hi = _mm512_srai_epi64(ab, 31);
    mask = _mm512_sub_epi64(_mm512_sllv_epi64(one, right), one);
    thr = _mm512_add_epi64(_mm512_srai_epi64(mask, 1),
                           _mm512_maskz_mov_epi64(_mm512_cmplt_epi64_mask(hi, zero), one));
    return _mm512_add_epi64(_mm512_srav_epi64(hi, right),
        _mm512_maskz_mov_epi64(_mm512_cmpgt_epi64_mask(_mm512_and_si512(hi, mask), thr), one));
}

/* up to 8 lanes: the mask of the first min(n, 8); masked loads and stores */
static inline __mmask8 nnc_lanes8(int32_t n) {
    return n >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << n) - 1u);
}
static inline __m512i nnc_ld_i32(const int32_t *p, __mmask8 k) {
    return _mm512_cvtepi32_epi64(_mm256_maskz_loadu_epi32(k, p));
}
static inline __m512i nnc_ld_i8(const int8_t *p, __mmask8 k) {
    return _mm512_cvtepi8_epi64(_mm_maskz_loadu_epi8((__mmask16)k, p));
}
/* clamp(v + zo, lo, hi) of 8 lanes stored as int8 (contiguous, or at a stride) */
static inline void nnc_st_req8(int8_t *p, int32_t stride, __mmask8 k, __m512i v, int32_t zo,
                               int32_t lo, int32_t hi) {
    v = _mm512_min_epi64(_mm512_max_epi64(_mm512_add_epi64(v, _mm512_set1_epi64(zo)),
                                          _mm512_set1_epi64(lo)), _mm512_set1_epi64(hi));
    if (stride == 1) {
        _mm512_mask_cvtepi64_storeu_epi8(p, k, v);
    } else {
        int8_t out[16];
        _mm_storeu_si128((__m128i *)(void *)out, _mm512_cvtepi64_epi8(v));
        for (int32_t i = 0; i < 8 && ((k >> i) & 1); i++) p[(int64_t)i * stride] = out[i];
    }
}
#endif

/* y[r * ys_row + o * ys_col] = req(acc[r * ldc + o] + bias[o], m[o], s[o]), o < cols;
 * fast: the generator proved acc + bias in int32, every s <= 0 and m >= 0 */
NNC_KERNEL void nnc_requant(const int32_t *restrict acc, int32_t rows, int32_t cols,
                            int32_t ldc, const int64_t *restrict bias,
                            const int32_t *restrict m, const int32_t *restrict s, int32_t zo,
                            int32_t lo, int32_t hi, int8_t *restrict y, int32_t ys_row,
                            int32_t ys_col, int32_t fast) {
    (void)fast;
    for (int32_t r = 0; r < rows; r++) {
        const int32_t *ar = acc + (int64_t)r * ldc;
        int8_t *yr = y + (int64_t)r * ys_row;
        int32_t o = 0;
#ifdef NNC_VNNI
        for (; o < cols; o += 8) {
            const __mmask8 k = nnc_lanes8(cols - o);
            const __m512i x = _mm512_add_epi64(nnc_ld_i32(ar + o, k),
                                               _mm512_maskz_loadu_epi64(k, bias + o));
            const __m512i mv = nnc_ld_i32(m + o, k), sv = nnc_ld_i32(s + o, k);
            nnc_st_req8(yr + (int64_t)o * ys_col, ys_col, k,
                        fast ? nnc_mbqm8_fast(x, mv, sv) : nnc_mbqm8(x, mv, sv), zo, lo, hi);
        }
#endif
        for (; o < cols; o++)
            yr[(int64_t)o * ys_col] = nnc_req((int64_t)ar[o] + bias[o], m[o], s[o], zo, lo, hi);
    }
}

/* y[i] = req(acc[i] + bias, m, s) for i < n: one channel's outputs */
NNC_INLINE void nnc_requant_row(const int32_t *restrict acc, int32_t n, int64_t bias, int32_t m,
                                int32_t s, int32_t zo, int32_t lo, int32_t hi,
                                int8_t *restrict y) {
    int32_t i = 0;
#ifdef NNC_VNNI
    const __m512i vb = _mm512_set1_epi64(bias), vm = _mm512_set1_epi64(m),
                  vs = _mm512_set1_epi64(s);
    for (; i < n; i += 8) {
        const __mmask8 k = nnc_lanes8(n - i);
        nnc_st_req8(y + i, 1, k, nnc_mbqm8(_mm512_add_epi64(nnc_ld_i32(acc + i, k), vb), vm, vs),
                    zo, lo, hi);
    }
#endif
    for (; i < n; i++) y[i] = nnc_req((int64_t)acc[i] + bias, m, s, zo, lo, hi);
}

/* int8 [c, h, w] -> uint8 [c, h + 2 ph, w + 2 pw] (x + 128), the border = fill */
NNC_KERNEL void nnc_pad_u8(const int8_t *restrict x, int32_t c, int32_t h, int32_t w,
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
NNC_KERNEL void nnc_im2col(const uint8_t *restrict xp, int32_t hp, int32_t wp, int32_t c0,
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
NNC_KERNEL void nnc_conv_direct(const uint8_t *restrict xp, int32_t hp, int32_t wp,
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
        nnc_requant_row(acc, p, bias[o], m[o], s[o], zo, lo, hi, y + (int64_t)o * p);
    }
}

/* max pooling over [c, h, w] (padding never wins) */
NNC_KERNEL void nnc_maxpool(const int8_t *restrict x, int32_t c, int32_t h, int32_t w,
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
NNC_KERNEL void nnc_avgpool(const int8_t *restrict x, int32_t c, int32_t h, int32_t w,
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
NNC_KERNEL void nnc_mean(const int8_t *restrict x, const int32_t *restrict kept, int32_t nk,
                         const int32_t *restrict red, int32_t nr, int32_t zx, int32_t m,
                         int32_t s, int32_t zo, int32_t lo, int32_t hi, int8_t *restrict y) {
    for (int32_t o = 0; o < nk; o++) {
        int64_t sum = 0;
        for (int32_t r = 0; r < nr; r++) sum += x[kept[o] + red[r]] - zx;
        y[o] = nnc_req(sum, m, s, zo, lo, hi);
    }
}

#define NNC_AL64(x) (((int64_t)(x) + 63) & ~(int64_t)63)

/* one int8 matrix product [mm, kk] @ [kk, nn] -> req(sum (a - za)(b - zb), m, s) [mm, nn], as
 * the dot-product kernel: sum (a + 128) b, then the zero-point terms per row and column
 * (exact). scratch: see nnc_matmul_scratch (64-byte aligned). */
NNC_KERNEL void nnc_matmul(const int8_t *restrict a, int32_t za, const int8_t *restrict b,
                           int32_t zb, int32_t mm, int32_t kk, int32_t nn, int32_t m, int32_t s,
                           int32_t zo, int32_t lo, int32_t hi, uint8_t *restrict scratch,
                           int8_t *restrict y) {
    const int32_t kp = (kk + 3) & ~3, n16 = (nn + 15) & ~15;
    const int64_t zz = 128 + (int64_t)za;
    uint8_t *ua = scratch;
    int8_t *wb = (int8_t *)(scratch + NNC_AL64((int64_t)mm * kp));
    int32_t *acc = (int32_t *)(void *)((uint8_t *)wb + NNC_AL64((int64_t)n16 * kp));
    int64_t *col = (int64_t *)(void *)((uint8_t *)acc + NNC_AL64((int64_t)mm * n16 * 4));
    int32_t *mv = (int32_t *)(void *)((uint8_t *)col + NNC_AL64((int64_t)n16 * 8));
    int32_t *sv = mv + nn;
    nnc_to_u8(a, ua, mm, kk, kp);
    memset(wb, 0, (size_t)n16 * kp);
    for (int32_t k = 0; k < kk; k++)
        for (int32_t j = 0; j < nn; j++)
            wb[((int64_t)(j >> 4) * (kp >> 2) + (k >> 2)) * 64 + (j & 15) * 4 + (k & 3)] =
                b[(int64_t)k * nn + j];
    for (int32_t j = 0; j < nn; j++) {
        int64_t sum = 0;
        for (int32_t k = 0; k < kk; k++) sum += b[(int64_t)k * nn + j];
        col[j] = -zz * sum;
        mv[j] = m;
        sv[j] = s;
    }
    nnc_gemm(ua, mm, kp, wb, n16, acc);
    for (int32_t i = 0; i < mm; i++) {
        int64_t sum = 0;
        for (int32_t k = 0; k < kk; k++) sum += ua[(int64_t)i * kp + k];
        const int32_t c = (int32_t)(-(int64_t)zb * sum + (int64_t)kk * zz * zb);
        for (int32_t j = 0; j < nn; j++) acc[(int64_t)i * n16 + j] += c;
    }
    nnc_requant(acc, mm, nn, n16, col, mv, sv, zo, lo, hi, y, nn, 1, 0);
}

/* TensorFlow Lite's int8 add: ta = mbqm((a - za) 2^20, ma, sa), tb alike, then
 * req(ta + tb, m, s) */
NNC_INLINE void nnc_add(const int8_t *restrict a, const int8_t *restrict b, int32_t n,
                        int32_t za, int32_t ma, int32_t sa, int32_t zb, int32_t mb, int32_t sb,
                        int32_t m, int32_t s, int32_t zo, int32_t lo, int32_t hi,
                        int8_t *restrict y) {
    int32_t i = 0;
#ifdef NNC_VNNI
    const __m512i vza = _mm512_set1_epi64(za), vma = _mm512_set1_epi64(ma),
                  vsa = _mm512_set1_epi64(sa), vzb = _mm512_set1_epi64(zb),
                  vmb = _mm512_set1_epi64(mb), vsb = _mm512_set1_epi64(sb),
                  vm = _mm512_set1_epi64(m), vs = _mm512_set1_epi64(s);
    for (; i < n; i += 8) {
        const __mmask8 k = nnc_lanes8(n - i);
        const __m512i ta = nnc_mbqm8(_mm512_slli_epi64(_mm512_sub_epi64(nnc_ld_i8(a + i, k), vza),
                                                       20), vma, vsa);
        const __m512i tb = nnc_mbqm8(_mm512_slli_epi64(_mm512_sub_epi64(nnc_ld_i8(b + i, k), vzb),
                                                       20), vmb, vsb);
        nnc_st_req8(y + i, 1, k, nnc_mbqm8(_mm512_add_epi64(ta, tb), vm, vs), zo, lo, hi);
    }
#endif
    for (; i < n; i++)
        y[i] = nnc_req(nnc_mbqm((int64_t)(a[i] - za) * (1 << 20), ma, sa)
                       + nnc_mbqm((int64_t)(b[i] - zb) * (1 << 20), mb, sb), m, s, zo, lo, hi);
}

NNC_INLINE void nnc_mul(const int8_t *restrict a, const int8_t *restrict b, int32_t n,
                        int32_t za, int32_t zb, int32_t m, int32_t s, int32_t zo, int32_t lo,
                        int32_t hi, int8_t *restrict y) {
    int32_t i = 0;
#ifdef NNC_VNNI
    const __m512i vza = _mm512_set1_epi64(za), vzb = _mm512_set1_epi64(zb),
                  vm = _mm512_set1_epi64(m), vs = _mm512_set1_epi64(s);
    for (; i < n; i += 8) {
        const __mmask8 k = nnc_lanes8(n - i);
        nnc_st_req8(y + i, 1, k, nnc_mbqm8(_mm512_mul_epi32(_mm512_sub_epi64(nnc_ld_i8(a + i, k), vza),
                                                            _mm512_sub_epi64(nnc_ld_i8(b + i, k), vzb)),
                                           vm, vs), zo, lo, hi);
    }
#endif
    for (; i < n; i++)
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
