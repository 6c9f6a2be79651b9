"""Affine int8 arithmetic (Jacob et al., 2018) against a scalar transcription of gemmlowp.

``SaturatingRoundingDoublingHighMul`` and ``RoundingDivideByPOT`` are re-read here on
Python ints with C's semantics (division truncates toward zero, ``>>`` on a negative
int32 is an arithmetic shift): negative values, ties and INT32_MIN saturation included.
Then the multiplier decomposition round-trips, fixed-point requantization stays within
one step of float requantization, and quantize -> dequantize loses at most half a step.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from nncompress.quant.affine import (
    QMAX,
    QMIN,
    WMAX,
    activation_qtype,
    fixed_point,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
    quantize_tensor,
    requantize_float,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
    weight_scales,
)

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


# -- gemmlowp, transcribed (fixedpoint/fixedpoint.h) on Python ints ---------------------
def c_div(n: int, d: int) -> int:
    """C's ``n / d`` on integers: the quotient truncated toward zero."""
    q = abs(n) // abs(d)
    return q if (n >= 0) == (d > 0) else -q


def c_srdhm(a: int, b: int) -> int:
    """``SaturatingRoundingDoublingHighMul(int32 a, int32 b)``."""
    overflow = a == b and a == INT32_MIN
    ab_64 = a * b
    nudge = (1 << 30) if ab_64 >= 0 else (1 - (1 << 30))
    ab_x2_high32 = c_div(ab_64 + nudge, 1 << 31)
    return INT32_MAX if overflow else ab_x2_high32


def c_rdbpot(x: int, exponent: int) -> int:
    """``RoundingDivideByPOT(int32 x, int exponent)``; Python's ``>>`` and ``&`` on a
    negative int are those of two's complement (arithmetic shift)."""
    mask = (1 << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if remainder > threshold else 0)


def c_mbqm(x: int, m0: int, shift: int) -> int:
    """TensorFlow Lite's ``MultiplyByQuantizedMultiplier`` (saturating left shift first)."""
    left, right = max(shift, 0), max(-shift, 0)
    shifted = min(max(x * (1 << left), INT32_MIN), INT32_MAX)
    return c_rdbpot(c_srdhm(shifted, m0), right)


def int32_samples(rng: random.Random, n: int) -> list[int]:
    edges = [INT32_MIN, INT32_MIN + 1, -(2**30), -1, 0, 1, 2**30, INT32_MAX - 1, INT32_MAX]
    return edges + [rng.randint(INT32_MIN, INT32_MAX) for _ in range(n)] + \
        [rng.randint(-5000, 5000) for _ in range(n)]


def test_srdhm_equals_gemmlowp_on_int32_pairs() -> None:
    rng = random.Random(0)
    xs = int32_samples(rng, 300)
    a = [rng.choice(xs) for _ in range(4000)] + [INT32_MIN, INT32_MIN, INT32_MAX, -7, 7]
    b = [rng.choice(xs) for _ in range(4000)] + [INT32_MIN, INT32_MAX, INT32_MIN, -3, -3]
    got = saturating_rounding_doubling_high_mul(torch.tensor(a), torch.tensor(b)).tolist()
    assert got == [c_srdhm(p, q) for p, q in zip(a, b, strict=True)]


def test_srdhm_saturation_and_ties() -> None:
    f = saturating_rounding_doubling_high_mul
    t = torch.tensor
    assert f(t([INT32_MIN]), t([INT32_MIN])).item() == INT32_MAX       # the one overflow
    assert f(t([INT32_MIN]), t([INT32_MAX])).item() == -INT32_MAX      # no saturation here
    # a * b = +-2^30 is exactly half of 2^31: a positive tie rounds up, a negative one
    # toward zero (nudge 1 - 2^30, then truncation), as in gemmlowp
    assert f(t([2**15]), t([2**15])).item() == 1
    assert f(t([-(2**15)]), t([2**15])).item() == 0
    assert f(t([-(2**15) - 1]), t([2**15])).item() == -1   # just past the tie
    assert f(t([2**15 - 1]), t([2**15])).item() == 0       # just under the tie
    assert f(t([-(2**15 - 1)]), t([2**15])).item() == 0


def test_rounding_divide_by_pot_equals_gemmlowp() -> None:
    rng = random.Random(1)
    xs = int32_samples(rng, 400)
    exps = [rng.randint(0, 31) for _ in xs]
    got = rounding_divide_by_pot(torch.tensor(xs), torch.tensor(exps)).tolist()
    assert got == [c_rdbpot(x, e) for x, e in zip(xs, exps, strict=True)]


@pytest.mark.parametrize(("x", "exponent", "want"), [
    (5, 1, 3), (-5, 1, -3), (3, 1, 2), (-3, 1, -2), (-1, 1, -1), (1, 1, 1),   # ties away
    (6, 2, 2), (-6, 2, -2), (5, 2, 1), (-5, 2, -1), (7, 0, 7), (-7, 0, -7),
    (INT32_MIN, 31, -1), (INT32_MAX, 31, 1), (INT32_MIN, 1, -(2**30)),
])
def test_rounding_divide_by_pot_ties_away_from_zero(x: int, exponent: int, want: int) -> None:
    assert c_rdbpot(x, exponent) == want
    got = rounding_divide_by_pot(torch.tensor([x]), torch.tensor([exponent]))
    assert got.item() == want and got.dtype == torch.int64


def test_multiply_by_quantized_multiplier_equals_tflite() -> None:
    rng = random.Random(2)
    accs = int32_samples(rng, 200)
    reals = [rng.uniform(1e-6, 0.999) for _ in accs[:150]] + \
        [rng.uniform(1.0, 40.0) for _ in accs[150:]]
    pairs = [quantize_multiplier(r) for r in reals]
    got = multiply_by_quantized_multiplier(
        torch.tensor(accs), torch.tensor([p[0] for p in pairs]),
        torch.tensor([p[1] for p in pairs])).tolist()
    assert got == [c_mbqm(x, m, s) for x, (m, s) in zip(accs, pairs, strict=True)]


@pytest.mark.parametrize("bits", [31, 15])
def test_quantize_multiplier_round_trips(bits: int) -> None:
    """``M0 * 2^(shift - 31)`` is ``real`` within 2^-31 relative (31 bits: M0 >= 2^30,
    error <= half a unit) or 2^-15 (15 significant bits, the low 16 bits zero)."""
    rng = random.Random(3)
    reals = [math.exp(rng.uniform(-18.0, 6.0)) for _ in range(2000)] + [
        0.5, 1.0, 2.0, 0.75, 1 - 2**-40, 2**-20, 123.456]
    bound = 2.0 ** -31 if bits == 31 else 2.0 ** -15
    for real in reals:
        m0, shift = quantize_multiplier(real, bits)
        assert 2**30 <= m0 < 2**31, real
        assert m0 % (1 << (31 - bits)) == 0
        back = m0 * 2.0 ** (shift - 31)
        assert abs(back - real) <= bound * real, (real, m0, shift)


def test_quantize_multiplier_edges() -> None:
    assert quantize_multiplier(0.0) == (0, 0)
    m0, shift = quantize_multiplier(1 - 2**-40)     # the mantissa rounds up to 1.0
    assert (m0, shift) == (2**30, 1)
    assert quantize_multiplier(2.0**-40) == (0, 0)   # below 2^-32: exactly zero
    for bad in (-0.5, math.nan, math.inf):
        with pytest.raises(ValueError, match="multiplier"):
            quantize_multiplier(bad)
    m, s = fixed_point(torch.tensor([[0.25, 3.0], [0.0, 0.7]], dtype=torch.float64), bits=15)
    assert m.dtype == s.dtype == torch.int32 and m.shape == (2, 2)
    assert (m[1, 0].item(), s[1, 0].item()) == (0, 0)
    assert (m[0, 0].item(), s[0, 0].item()) == quantize_multiplier(0.25, 15)


@pytest.mark.parametrize("regime", ["below_one", "above_one"])
def test_fixed_point_requantization_within_one_step_of_float(regime: str) -> None:
    """Random int32 accumulators times random multipliers in (0, 1) or > 1 (kept within
    int32 after the left shift): the integer result is ``round(acc * M)`` within 1."""
    g = torch.Generator().manual_seed(4)
    n = 20000
    if regime == "below_one":
        reals = torch.rand(n, generator=g, dtype=torch.float64).clamp(min=1e-9) ** 3
        accs = torch.randint(INT32_MIN, INT32_MAX, (n,), generator=g, dtype=torch.int64)
    else:
        reals = 1.0 + 60.0 * torch.rand(n, generator=g, dtype=torch.float64)
        limit = (2.0**31 / (2 * reals)).floor().to(torch.int64)   # |acc * 2^shift| < 2^31
        accs = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1).mul(limit).round() \
            .to(torch.int64)
    m, s = fixed_point(reals)
    fixed = multiply_by_quantized_multiplier(accs, m, s)
    exact = requantize_float(accs, reals)
    assert (fixed - exact).abs().max().item() <= 1      # two roundings: off by one at most
    m15, s15 = fixed_point(reals, bits=15)     # the 2-byte multipliers: 2^-15 relative
    err15 = multiply_by_quantized_multiplier(accs, m15, s15) - requantize_float(accs, reals)
    bound = 1 + (accs.double() * reals).abs() * 2.0**-15
    assert (err15.abs().double() <= bound).all()


@pytest.mark.parametrize(("lo", "hi"), [(-1.0, 1.0), (-0.3, 5.7), (0.0, 6.0), (-9.0, -2.0),
                                        (0.01, 0.02), (-123.4, 0.5), (-1e-3, 2e-3)])
def test_quantize_dequantize_error_within_half_a_step(lo: float, hi: float) -> None:
    qt = activation_qtype(lo, hi)
    a, b = min(lo, 0.0), max(hi, 0.0)
    real = torch.linspace(a, b, 5001, dtype=torch.float64)
    real = torch.cat([real, torch.rand(5000, generator=torch.Generator().manual_seed(5),
                                       dtype=torch.float64) * (b - a) + a])
    q = quantize_tensor(real, qt.scale, qt.zero_point)
    assert q.dtype == torch.int64 and q.min() >= QMIN and q.max() <= QMAX
    back = (q - qt.zero_point).double() * qt.scale
    assert (back - real).abs().max().item() <= qt.scale / 2 * (1 + 1e-9)
    assert qt.scale == pytest.approx((b - a) / 255)


def test_activation_qtype_represents_zero_exactly() -> None:
    rng = random.Random(6)
    ranges = [(rng.uniform(-50, 50), rng.uniform(-50, 50)) for _ in range(500)]
    ranges += [(0.0, 1.0), (-1.0, 0.0), (3.0, 4.0), (-4.0, -3.0), (-1e-5, 7e3)]
    for lo, hi in ranges:
        lo, hi = min(lo, hi), max(lo, hi)
        qt = activation_qtype(lo, hi)
        assert qt.dtype == "int8" and isinstance(qt.zero_point, int)
        assert QMIN <= qt.zero_point <= QMAX and qt.scale > 0
        q0 = quantize_tensor(torch.zeros(1), qt.scale, qt.zero_point)
        assert q0.item() == qt.zero_point
        assert ((q0 - qt.zero_point).double() * qt.scale).item() == 0.0
    assert activation_qtype(0.0, 0.0).scale == 1.0                 # degenerate range
    assert activation_qtype(2.0, 2.0).zero_point == QMIN            # widened to [0, 2]
    assert activation_qtype(-math.inf, 1.0).scale == 1.0


def test_weight_scales_are_symmetric_narrow_range() -> None:
    g = torch.Generator().manual_seed(7)
    w = torch.randn(6, 3, 5, generator=g)
    w[2] = 0.0
    per_channel = weight_scales(w)
    assert per_channel.shape == (6,) and per_channel.dtype == torch.float64
    assert per_channel[2].item() == 1.0
    q = quantize_tensor(w, per_channel.reshape(-1, 1, 1), 0, -WMAX, WMAX)
    assert q.abs().max().item() == WMAX and (q[2] == 0).all()
    err = (q.double() * per_channel.reshape(-1, 1, 1) - w.double()).abs()
    assert (err <= per_channel.reshape(-1, 1, 1) / 2 + 1e-12).all()
    assert weight_scales(w, per_channel=False).item() == pytest.approx(w.abs().max() / WMAX)
