"""Affine int8 quantization arithmetic (Jacob et al., 2018) with exact integer semantics.

Jacob, Kligys, Chen, Zhu, Tang, Howard, Adam & Kalenichenko (2018), "Quantization and
training of neural networks for efficient integer-arithmetic-only inference":

- a real value ``r`` is represented by an integer ``q`` as ``r = S * (q - Z)`` (eq. 1),
  ``S`` a positive real scale, ``Z`` the integer zero-point (``r = 0`` is exact);
- a product of two quantized tensors accumulates ``sum (q1 - Z1)(q2 - Z2)`` in int32
  (eq. 4) and is brought to the output's scale by the real multiplier
  ``M = S1 S2 / S3``, always in (0, 1) in practice, written ``M = 2^-n M0`` with
  ``M0`` in [0.5, 1) held as the int32 ``round(M0 * 2^31)`` (eq. 5-6). Multiplying by
  ``M0`` is gemmlowp's ``SaturatingRoundingDoublingHighMul`` and the ``2^-n`` is the
  rounding right shift ``RoundingDivideByPOT`` -- section 2.2, reproduced bit for bit
  here (the same functions TensorFlow Lite calls ``MultiplyByQuantizedMultiplier``).

Every function on integer tensors here uses integer torch ops only (int64 intermediates,
truncating division and arithmetic shifts), so the C engine and the ONNX export can
match it exactly. Weights are symmetric (``Z = 0``) in the narrow range [-127, 127],
per output channel by default; activations are asymmetric int8 [-128, 127].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["QMAX", "QMIN", "WMAX", "QType", "activation_qtype", "fixed_point",
           "multiply_by_quantized_multiplier", "quantize_multiplier", "quantize_tensor",
           "requantize_float", "rounding_divide_by_pot", "saturating_rounding_doubling_high_mul",
           "weight_scales"]

QMIN, QMAX = -128, 127     # int8 activations
WMAX = 127                 # int8 weights: [-127, 127] (symmetric, narrow range)
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


@dataclass(frozen=True)
class QType:
    """How one tensor value of an integer program is represented.

    ``dtype`` is ``"int8"`` (affine: ``real = scale * (q - zero_point)``), ``"float32"``
    (a real tensor: scale 1, zero-point 0) or ``"int64"`` (token ids: not a real number).
    """

    dtype: str
    scale: float = 1.0
    zero_point: int = 0

    def to_json(self) -> list:
        return [self.dtype, self.scale, self.zero_point]


def activation_qtype(lo: float, hi: float) -> QType:
    """The int8 affine type covering ``[lo, hi]`` widened to include 0 (eq. 1: zero is
    exactly representable); a degenerate range gets scale 1."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo <= 1e-12 or not math.isfinite(hi - lo):
        return QType("int8", 1.0, 0)
    scale = float(f"{(hi - lo) / (QMAX - QMIN):.8g}")   # 8 digits: a short record
    zero_point = round(QMIN - lo / scale)
    return QType("int8", scale, max(QMIN, min(QMAX, zero_point)))


def weight_scales(weight: torch.Tensor, per_channel: bool = True) -> torch.Tensor:
    """Symmetric scales ``max|w| / 127`` per output channel (dim 0) or one for the tensor,
    float64 ``[C]`` (``[1]`` per tensor); an all-zero channel gets scale 1."""
    w = weight.detach().double()
    amax = w.abs().flatten(1).amax(dim=1) if per_channel else w.abs().max().reshape(1)
    return torch.where(amax > 0, amax / WMAX, torch.ones_like(amax))


def quantize_tensor(real: torch.Tensor, scale: torch.Tensor | float, zero_point: int = 0,
                    lo: int = QMIN, hi: int = QMAX) -> torch.Tensor:
    """``clamp(round(real / scale) + zero_point, lo, hi)`` (round half to even, as C's
    ``rint``); ``scale`` broadcasts against ``real``. Returns int64."""
    q = torch.round(real.double() / torch.as_tensor(scale, dtype=torch.float64))
    return (q.to(torch.int64) + zero_point).clamp(lo, hi)


def quantize_multiplier(real: float, bits: int = 31) -> tuple[int, int]:
    """``real`` (> 0) as ``(M0, shift)`` with ``real ~= M0 * 2^(shift - 31)``, ``M0`` in
    [2^30, 2^31) (TensorFlow Lite's ``QuantizeMultiplier``); ``(0, 0)`` for 0.

    ``bits`` < 31 rounds ``M0`` to that many significant bits (its low ``31 - bits`` bits
    zero): the arithmetic is unchanged, the per-channel multipliers of a layer then store in
    2 bytes each (15 bits: relative error 2^-16, far below one output step)."""
    if real == 0.0:
        return 0, 0
    if real < 0 or not math.isfinite(real):
        raise ValueError(f"a requantization multiplier must be finite and >= 0, got {real}")
    mantissa, shift = math.frexp(real)            # real = mantissa * 2^shift, mantissa in [0.5, 1)
    m0 = round(mantissa * 2**bits) << (31 - bits)
    if m0 == 2**31:                               # rounding reached 1.0
        m0 //= 2
        shift += 1
    if shift < -31:                               # too small to matter: exactly zero
        return 0, 0
    return m0, shift


def fixed_point(reals: torch.Tensor, bits: int = 31) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_multiplier` of every element: int32 multipliers and int32 shifts."""
    pairs = [quantize_multiplier(float(r), bits) for r in reals.flatten().tolist()]
    m = torch.tensor([p[0] for p in pairs], dtype=torch.int32).reshape(reals.shape)
    s = torch.tensor([p[1] for p in pairs], dtype=torch.int32).reshape(reals.shape)
    return m, s


def saturating_rounding_doubling_high_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """gemmlowp's ``SaturatingRoundingDoublingHighMul`` on int32 values held in int64:
    ``(a * b + nudge) / 2^31`` truncated toward zero, ``nudge = 2^30`` for a product >= 0
    and ``1 - 2^30`` otherwise; ``a = b = INT32_MIN`` saturates to ``INT32_MAX``."""
    a, b = a.to(torch.int64), b.to(torch.int64)
    ab = a * b
    nudge = torch.where(ab >= 0, torch.tensor(2**30), torch.tensor(1 - 2**30))
    out = torch.div(ab + nudge, 2**31, rounding_mode="trunc")
    overflow = (a == _INT32_MIN) & (b == _INT32_MIN)
    return torch.where(overflow, torch.tensor(_INT32_MAX), out)


def rounding_divide_by_pot(x: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """gemmlowp's ``RoundingDivideByPOT``: ``x / 2^exponent`` rounded to nearest, ties away
    from zero (``exponent`` >= 0; int64 in, int64 out)."""
    x, exponent = x.to(torch.int64), exponent.to(torch.int64)
    mask = torch.bitwise_left_shift(torch.ones_like(exponent), exponent) - 1
    remainder = torch.bitwise_and(x, mask)
    threshold = torch.bitwise_right_shift(mask, 1) + (x < 0).to(torch.int64)
    return torch.bitwise_right_shift(x, exponent) + (remainder > threshold).to(torch.int64)


def multiply_by_quantized_multiplier(x: torch.Tensor, multiplier: torch.Tensor,
                                     shift: torch.Tensor) -> torch.Tensor:
    """TensorFlow Lite's ``MultiplyByQuantizedMultiplier(x, M0, shift)``: ``x`` an int32
    accumulator (held in int64), ``M0``/``shift`` from :func:`quantize_multiplier`
    (broadcast against ``x``). A positive shift is applied as a saturating left shift first,
    a negative one as the rounding right shift after the high multiply. Returns int64."""
    multiplier = torch.as_tensor(multiplier, dtype=torch.int64)
    shift = torch.as_tensor(shift, dtype=torch.int64)
    left = shift.clamp(min=0)
    right = (-shift).clamp(min=0)
    shifted = (x.to(torch.int64) * torch.bitwise_left_shift(torch.ones_like(left), left))
    shifted = shifted.clamp(_INT32_MIN, _INT32_MAX)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(shifted, multiplier),
                                  right)


def requantize_float(x: torch.Tensor, real: torch.Tensor | float) -> torch.Tensor:
    """The float requantization :func:`multiply_by_quantized_multiplier` approximates:
    ``round(x * real)`` in float64 (for tests and error bounds)."""
    return torch.round(x.double() * torch.as_tensor(real, dtype=torch.float64)).to(torch.int64)
