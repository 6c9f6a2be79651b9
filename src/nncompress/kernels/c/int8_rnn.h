/* int8_rnn.h: the integer GRU (Cho et al., 2014) and LSTM (Hochreiter & Schmidhuber, 1997)
 * of nncompress.quant.int8_rnn, for programs that have them: int8 gate matrices, int32
 * accumulators, Q.10 int16 pre-activations, gates from one interpolated 257-entry int16 tanh
 * table, Q0.15 state, int8 Q0.7 outputs -- the module docstring of int8_rnn is the spec and
 * this file follows it step by step (bit-exact).
 *
 * One call runs one layer and direction over a block of nb samples: the input side of every
 * step as one u8 x s8 product (nb * T rows), then per step the recurrent product of the nb
 * int8 states (nb rows) and the cell.
 */
#ifndef NNC_INT8_RNN_H
#define NNC_INT8_RNN_H

NNC_INLINE int64_t nnc_sat(int64_t v, int64_t lo, int64_t hi) {
    return v < lo ? lo : (v > hi ? hi : v);
}

/* rdpot on int32 (every such quantity of the cell fits: see nnc_cell) */
NNC_INLINE int32_t nnc_rd32(int32_t x, int32_t n) {
    const int32_t mask = (1 << n) - 1;
    return (x >> n) + ((x & mask) > (mask >> 1) + (x < 0));
}

/* sign(p) tanh(|p| / 2^f) in Q0.15 from the table (step 2^-5), linearly interpolated.
 * pairs[j] holds table entries j (low 16 bits) and j + 1 (high 16 bits): one load (one
 * gather when vectorised) per lookup. */
NNC_INLINE int32_t nnc_gate_lookup(const int32_t *restrict pairs, int32_t p, int32_t f) {
    const int32_t k = f - 5, lim = (8 << f) - 1;
    int32_t a = p < 0 ? -p : p;
    a = a > lim ? lim : a;
    {
        const int32_t e = pairs[a >> k];
        const int32_t lo = (int32_t)((uint32_t)e << 16) >> 16, hi = e >> 16;
        const int32_t v = lo + nnc_rd32((hi - lo) * (a & ((1 << k) - 1)), k);
        return p < 0 ? -v : v;
    }
}

NNC_INLINE int32_t nnc_gate_tanh(const int32_t *restrict tab, int32_t p) {
    return nnc_gate_lookup(tab, p, 10);
}

NNC_INLINE int32_t nnc_gate_sigmoid(const int32_t *restrict tab, int32_t p) {
    return (nnc_gate_lookup(tab, p, 11) + 32768) >> 1;
}

/* acc [rows, ldc] + bias -> sat16(mbqm(., m, s)) [rows, g] */
NNC_INLINE void nnc_pre16(const int32_t *restrict acc, int32_t rows, int32_t g, int32_t ldc,
                          const int64_t *restrict bias, const int32_t *restrict m,
                          const int32_t *restrict s, int16_t *restrict out) {
    for (int32_t r = 0; r < rows; r++) {
        const int32_t *ar = acc + (int64_t)r * ldc;
        int16_t *orow = out + (int64_t)r * g;
        int32_t o = 0;
#ifdef NNC_VNNI
        const __m512i vlo = _mm512_set1_epi64(-32768), vhi = _mm512_set1_epi64(32767);
        for (; o < g; o += 8) {
            const __mmask8 k = nnc_lanes8(g - o);
            __m512i v = nnc_mbqm8(_mm512_add_epi64(nnc_ld_i32(ar + o, k),
                                                   _mm512_maskz_loadu_epi64(k, bias + o)),
                                  nnc_ld_i32(m + o, k), nnc_ld_i32(s + o, k));
            v = _mm512_min_epi64(_mm512_max_epi64(v, vlo), vhi);
            _mm512_mask_cvtepi64_storeu_epi16(orow + o, k, v);
        }
#endif
        for (; o < g; o++)
            orow[o] = (int16_t)nnc_sat(nnc_mbqm((int64_t)ar[o] + bias[o], m[o], s[o]),
                                       -32768, 32767);
    }
}

/* one cell step of one sample: gx, gh [G*H] Q.10; h (Q0.15) and c (2^-15) updated. In
 * int32 (exact): gate arguments are sums of two int16, gates lie in [-32767, 32767], h stays
 * between n and its previous value so |h - n| <= 65534 and z (h - n) < 2^31; only the LSTM's
 * f * c needs int64. A plain loop gcc vectorises (gathers for the table); never inlined, so
 * its restrict pointers keep telling gcc that nothing aliases. */
static NNC_UNUSED NNC_NOINLINE void nnc_cell(int32_t lstm, const int16_t *restrict gx, const int16_t *restrict gh,
                         int32_t hidden, const int32_t *restrict tab, int32_t *restrict h,
                         int32_t *restrict c) {
    if (lstm) {
        for (int32_t j = 0; j < hidden; j++) {
            const int32_t i = nnc_gate_sigmoid(tab, gx[j] + gh[j]);
            const int32_t f = nnc_gate_sigmoid(tab, gx[hidden + j] + gh[hidden + j]);
            const int32_t g = nnc_gate_tanh(tab, gx[2 * hidden + j] + gh[2 * hidden + j]);
            const int32_t o = nnc_gate_sigmoid(tab, gx[3 * hidden + j] + gh[3 * hidden + j]);
            int64_t cv = nnc_rdpot((int64_t)f * c[j], 15) + nnc_rd32(i * g, 15);
            cv = cv < NNC_I32_MIN ? NNC_I32_MIN : (cv > NNC_I32_MAX ? NNC_I32_MAX : cv);
            c[j] = (int32_t)cv;
            h[j] = nnc_rd32(o * nnc_gate_tanh(tab, (int32_t)nnc_rdpot(cv, 5)), 15);
        }
    } else {
        for (int32_t j = 0; j < hidden; j++) {
            const int32_t r = nnc_gate_sigmoid(tab, gx[j] + gh[j]);
            const int32_t z = nnc_gate_sigmoid(tab, gx[hidden + j] + gh[hidden + j]);
            const int32_t n = nnc_gate_tanh(tab, gx[2 * hidden + j]
                                            + nnc_rd32(r * gh[2 * hidden + j], 15));
            h[j] = n + nnc_rd32(z * (h[j] - n), 15);
        }
    }
}

/* The weights (packed for nnc_gemm: g16 = G H rounded up to 16 outputs, kp_in / kp_h
 * inputs), folded biases (-(128 + zx) sum w), multipliers and shifts of one layer and
 * direction. */
typedef struct {
    const int8_t *w_ih; const int64_t *b_ih; const int32_t *m_ih; const int32_t *s_ih;
    const int8_t *w_hh; const int64_t *b_hh; const int32_t *m_hh; const int32_t *s_hh;
} nnc_rnn_weights;

/* Scratch of one call: ux [nb T kp_in], acc [nb T G H] int32, gx [nb T G H] int16,
 * uh [nb kp_h], gh [nb G H] int16, h / c [nb H] int32, h8 [nb H] int8. */
typedef struct {
    uint8_t *ux; int32_t *acc; int16_t *gx; uint8_t *uh; int16_t *gh; int32_t *h; int32_t *c;
    int8_t *h8;
} nnc_rnn_scratch;

/* One layer and direction over x [nb, T, in_f] int8: y[s, t, y_off + j] (rows of y_len),
 * the last h8 at hn[s * hn_stride + j], the last cell (LSTM) at cn likewise. */
NNC_KERNEL void nnc_rnn_dir(int32_t lstm, const int8_t *restrict x, int32_t nb, int32_t t_len,
                            int32_t in_f, int32_t kp_in, int32_t hidden, int32_t kp_h,
                            int32_t g16,
                            nnc_rnn_weights w, const int32_t *restrict tab, int32_t reverse,
                            int8_t *restrict y, int32_t y_len, int32_t y_off,
                            int8_t *restrict hn, int8_t *restrict cn, int32_t hn_stride,
                            nnc_rnn_scratch t) {
    const int32_t g = (lstm ? 4 : 3) * hidden;
    nnc_to_u8(x, t.ux, nb * t_len, in_f, kp_in);
    nnc_gemm(t.ux, nb * t_len, kp_in, w.w_ih, g16, t.acc);
    nnc_pre16(t.acc, nb * t_len, g, g16, w.b_ih, w.m_ih, w.s_ih, t.gx);
    for (int32_t i = 0; i < nb * hidden; i++) { t.h[i] = 0; t.c[i] = 0; t.h8[i] = 0; }
    for (int32_t step = 0; step < t_len; step++) {
        const int32_t ti = reverse ? t_len - 1 - step : step;
        nnc_to_u8(t.h8, t.uh, nb, hidden, kp_h);
        nnc_gemm(t.uh, nb, kp_h, w.w_hh, g16, t.acc);
        nnc_pre16(t.acc, nb, g, g16, w.b_hh, w.m_hh, w.s_hh, t.gh);
        for (int32_t s = 0; s < nb; s++) {
            int32_t *h = t.h + (int64_t)s * hidden;
            nnc_cell(lstm, t.gx + ((int64_t)s * t_len + ti) * g, t.gh + (int64_t)s * g, hidden,
                     tab, h, t.c + (int64_t)s * hidden);
            {
                int8_t *h8 = t.h8 + (int64_t)s * hidden;
                int8_t *ys = y + ((int64_t)s * t_len + ti) * y_len + y_off;
                for (int32_t j = 0; j < hidden; j++) {
                    const int32_t v = nnc_rd32(h[j], 8);
                    h8[j] = (int8_t)(v < -128 ? -128 : (v > 127 ? 127 : v));
                }
                memcpy(ys, h8, (size_t)hidden);
            }
        }
    }
    for (int32_t s = 0; s < nb; s++)
        for (int32_t j = 0; j < hidden; j++) {
            hn[(int64_t)s * hn_stride + j] = t.h8[(int64_t)s * hidden + j];
            if (lstm)
                cn[(int64_t)s * hn_stride + j] =
                    (int8_t)nnc_sat(nnc_rdpot(t.c[(int64_t)s * hidden + j], 11), -128, 127);
        }
}

#endif /* NNC_INT8_RNN_H */
