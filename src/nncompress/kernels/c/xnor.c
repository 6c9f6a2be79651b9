/* XNOR-popcount binary layers (Rastegari, Ordonez, Redmon & Farhadi, 2016, "XNOR-Net";
 * Courbariaux, Hubara, Soudry, El-Yaniv & Bengio, 2016, "Binarized neural networks").
 *
 * Signs are packed 64 to a uint64 word, bit i of word w holding element 64 w + i of a row;
 * a set bit means -1, a clear bit +1. Rows are padded to whole words with clear bits in
 * both operands, so padding XORs to 0 and never counts. For two rows a, b of K signs
 *
 *     dot(a, b) = K - 2 popcount(a XOR b)
 *
 * and an output is alpha[j] * dot + bias[j] (float32, multiply then add, no fused
 * multiply-add: -std=c99 turns contraction off), which is what the plain-torch reference
 * in nncompress/kernels/xnor.py computes. An activation x becomes -1 where x < t (its
 * threshold; 0 without one) and +1 otherwise (NaN gives +1).
 *
 * Convolutions are im2col on bits: every output position's receptive field is packed into
 * one row in the order (channel, kernel row, kernel column) -- the order of
 * weight.reshape(out, -1) -- and positions that fall in the zero padding get a clear
 * mask bit, so dot = valid - 2 popcount((a XOR b) AND mask), exactly a convolution of the
 * sign tensor with zero padding.
 *
 * The AVX-512 path (VPOPCNTDQ) is compiled when -march=native offers it; otherwise
 * __builtin_popcountll (POPCNT with -march=native). Every function returns 0, or -1 if
 * memory for the packed rows could not be allocated.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
#include <immintrin.h>
#define XNOR_AVX512 1
#else
#define XNOR_AVX512 0
#endif

#define STACK_WORDS 4096

/* 1 when the AVX-512 VPOPCNTDQ path was compiled in, else 0. */
int xnor_simd(void) { return XNOR_AVX512; }

static int64_t words_for(int64_t k) { return (k + 63) / 64; }

/* Pack one row of k floats into words_for(k) words; thr may be NULL (threshold 0). */
static void pack_row(const float *x, int64_t k, const float *thr, uint64_t *out) {
    int64_t words = words_for(k);
    for (int64_t w = 0; w < words; w++) {
        uint64_t bits = 0;
        int64_t base = w * 64;
        int64_t n = k - base < 64 ? k - base : 64;
#if XNOR_AVX512
        for (int64_t q = 0; q < n; q += 16) {
            int64_t left = n - q < 16 ? n - q : 16;
            __mmask16 lane = (__mmask16)((1u << left) - 1u);
            __m512 v = _mm512_maskz_loadu_ps(lane, x + base + q);
            __m512 t = thr ? _mm512_maskz_loadu_ps(lane, thr + base + q) : _mm512_setzero_ps();
            __mmask16 lt = _mm512_mask_cmp_ps_mask(lane, v, t, _CMP_LT_OQ);
            bits |= (uint64_t)lt << q;
        }
#else
        for (int64_t i = 0; i < n; i++) {
            float t = thr ? thr[base + i] : 0.0f;
            bits |= (uint64_t)(x[base + i] < t) << i;
        }
#endif
        out[w] = bits;
    }
}

/* Pack `rows` rows of k floats (row-major, contiguous) into out[rows][words_for(k)]. */
void xnor_pack(const float *x, int64_t rows, int64_t k, const float *thr, uint64_t *out) {
    int64_t words = words_for(k);
    for (int64_t r = 0; r < rows; r++) pack_row(x + r * k, k, thr, out + r * words);
}

/* popcount(a XOR b) over `words` words; mask (may be NULL) ANDed in first. */
static int64_t xor_count(const uint64_t *a, const uint64_t *b, const uint64_t *mask,
                         int64_t words) {
#if XNOR_AVX512
    __m512i acc = _mm512_setzero_si512();
    for (int64_t w = 0; w < words; w += 8) {
        int64_t left = words - w < 8 ? words - w : 8;
        __mmask8 lane = (__mmask8)((1u << left) - 1u);
        __m512i va = _mm512_maskz_loadu_epi64(lane, a + w);
        __m512i vb = _mm512_maskz_loadu_epi64(lane, b + w);
        __m512i x = _mm512_xor_si512(va, vb);
        if (mask) x = _mm512_and_si512(x, _mm512_maskz_loadu_epi64(lane, mask + w));
        acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(x));
    }
    return _mm512_reduce_add_epi64(acc);
#else
    int64_t count = 0;
    for (int64_t w = 0; w < words; w++) {
        uint64_t x = a[w] ^ b[w];
        if (mask) x &= mask[w];
        count += __builtin_popcountll(x);
    }
    return count;
#endif
}

#if XNOR_AVX512
/* popcount(a XOR w_r [AND mask]) for the four rows w_r = w + r * words, into c[0..3]. */
static void xor_count4(const uint64_t *a, const uint64_t *w, const uint64_t *mask,
                       int64_t words, int64_t *c) {
    __m512i acc0 = _mm512_setzero_si512(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    for (int64_t q = 0; q < words; q += 8) {
        int64_t left = words - q < 8 ? words - q : 8;
        __mmask8 lane = (__mmask8)((1u << left) - 1u);
        __m512i va = _mm512_maskz_loadu_epi64(lane, a + q);
        __m512i vm = mask ? _mm512_maskz_loadu_epi64(lane, mask + q) : _mm512_set1_epi64(-1);
#define XNOR_ACC(acc, r) acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(_mm512_and_si512( \
            _mm512_xor_si512(va, _mm512_maskz_loadu_epi64(lane, w + (r) * words + q)), vm)))
        XNOR_ACC(acc0, 0);
        XNOR_ACC(acc1, 1);
        XNOR_ACC(acc2, 2);
        XNOR_ACC(acc3, 3);
#undef XNOR_ACC
    }
    c[0] = _mm512_reduce_add_epi64(acc0);
    c[1] = _mm512_reduce_add_epi64(acc1);
    c[2] = _mm512_reduce_add_epi64(acc2);
    c[3] = _mm512_reduce_add_epi64(acc3);
}
#else
static void xor_count4(const uint64_t *a, const uint64_t *w, const uint64_t *mask,
                       int64_t words, int64_t *c) {
    for (int r = 0; r < 4; r++) c[r] = xor_count(a, w + r * words, mask, words);
}
#endif

/* out[(i / p) * n * p + i % p + j * p] = alpha[j] * dot(a_i, w_j) + bias[j] for the m rows
 * of a and n rows of w (p = 1: a [m, n] matrix; p = positions: conv layout [b, n, p]).
 * valid[i] is the number of unmasked bits of row i (k when mask is NULL). */
static void gemm(const uint64_t *a, const uint64_t *mask, const int64_t *valid, int64_t m,
                 const uint64_t *w, int64_t n, int64_t words, int64_t k, int64_t p,
                 const float *alpha, const float *bias, float *out) {
    for (int64_t i = 0; i < m; i++) {
        const uint64_t *row = a + i * words;
        const uint64_t *mrow = mask ? mask + i * words : NULL;
        int64_t full = valid ? valid[i] : k;
        float *o = out + (i / p) * n * p + i % p;
        int64_t j = 0, c[4];
        for (; j + 4 <= n; j += 4) {
            xor_count4(row, w + j * words, mrow, words, c);
            for (int r = 0; r < 4; r++) {
                float v = (float)(full - 2 * c[r]) * alpha[j + r];
                o[(j + r) * p] = bias ? v + bias[j + r] : v;
            }
        }
        for (; j < n; j++) {
            int64_t dot = full - 2 * xor_count(row, w + j * words, mrow, words);
            float v = (float)dot * alpha[j];
            o[j * p] = bias ? v + bias[j] : v;
        }
    }
}

/* Binary Linear: x [m, k] float, w [n, words_for(k)] packed, out [m, n]. */
int xnor_linear(const float *x, int64_t m, int64_t k, const float *thr, const uint64_t *w,
                int64_t n, const float *alpha, const float *bias, float *out) {
    int64_t words = words_for(k);
    uint64_t stack[STACK_WORDS];
    uint64_t *a = m * words <= STACK_WORDS ? stack : malloc((size_t)(m * words) * 8);
    if (!a) return -1;
    xnor_pack(x, m, k, thr, a);
    gemm(a, NULL, NULL, m, w, n, words, k, 1, alpha, bias, out);
    if (a != stack) free(a);
    return 0;
}

/* A binary Linear's weight-side operands, prepared once by the caller. */
typedef struct {
    int64_t k, n;
    const float *thr;
    const uint64_t *w;
    const float *alpha, *bias;
} LinearLayer;

/* xnor_linear with the layer's operands in one struct (fewer arguments per call). */
int xnor_linear_layer(const LinearLayer *layer, const float *x, int64_t m, float *out) {
    return xnor_linear(x, m, layer->k, layer->thr, layer->w, layer->n, layer->alpha,
                       layer->bias, out);
}

/* Geometry of a 2-D convolution (a 1-D one is h = kh = 1). */
typedef struct {
    int64_t b, c, h, wd, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo;
} Geometry;

/* im2col on bits: rows (b, oy, ox), bits (ci, u, v); mask bits and valid counts. */
static void im2col(const float *x, const Geometry *g, const float *thr, uint64_t *a,
                   uint64_t *mask, int64_t *valid, int64_t words) {
    int64_t rows = g->b * g->ho * g->wo;
    memset(a, 0, (size_t)(rows * words) * 8);
    memset(mask, 0, (size_t)(rows * words) * 8);
    for (int64_t r = 0; r < rows; r++) {
        int64_t bi = r / (g->ho * g->wo), oy = (r / g->wo) % g->ho, ox = r % g->wo;
        uint64_t *ar = a + r * words, *mr = mask + r * words;
        int64_t bit = 0, count = 0;
        for (int64_t ci = 0; ci < g->c; ci++) {
            const float *plane = x + (bi * g->c + ci) * g->h * g->wd;
            float t = thr ? thr[ci] : 0.0f;
            for (int64_t u = 0; u < g->kh; u++) {
                int64_t iy = oy * g->sh - g->ph + u * g->dh;
                for (int64_t v = 0; v < g->kw; v++, bit++) {
                    int64_t ix = ox * g->sw - g->pw + v * g->dw;
                    if (iy < 0 || iy >= g->h || ix < 0 || ix >= g->wd) continue;
                    uint64_t one = (uint64_t)1 << (bit & 63);
                    mr[bit >> 6] |= one;
                    if (plane[iy * g->wd + ix] < t) ar[bit >> 6] |= one;
                    count++;
                }
            }
        }
        valid[r] = count;
    }
}

/* Binary Conv2d (groups 1, zero padding): x [b, c, h, wd] float, w [n, words_for(c kh kw)]
 * packed, out [b, n, ho, wo]. geo = {b, c, h, wd, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo}. */
int xnor_conv2d(const float *x, const int64_t *geo, const float *thr, const uint64_t *w,
                int64_t n, const float *alpha, const float *bias, float *out) {
    Geometry g;
    memcpy(&g, geo, sizeof g);
    int64_t k = g.c * g.kh * g.kw, words = words_for(k), rows = g.b * g.ho * g.wo;
    uint64_t *a = malloc((size_t)(2 * rows * words) * 8);
    int64_t *valid = malloc((size_t)rows * 8);
    if (!a || !valid) {
        free(a);
        free(valid);
        return -1;
    }
    im2col(x, &g, thr, a, a + rows * words, valid, words);
    gemm(a, a + rows * words, valid, rows, w, n, words, k, g.ho * g.wo, alpha, bias, out);
    free(a);
    free(valid);
    return 0;
}
