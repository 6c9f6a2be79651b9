"""Low-bit quantizers (2-8 bits) trained with straight-through gradients.

Two families, both with one learned scale per tensor and integer codes in
``-qmax..qmax`` (signed) or ``0..qmax`` (unsigned), ``qmax = 2**(b-1) - 1`` signed and
``2**b - 1`` unsigned, so a signed ``b``-bit code fits ``b`` bits and zero is one code:

- :class:`LinearQuantizer`: uniform levels ``step * c``, the step learned with LSQ (Esser,
  McKinstry, Bablani, Appuswamy & Modha, "Learned step size quantization", 2020): in
  training ``v_hat = round(clip(v / s, -qn, qp)) * s`` with the straight-through estimator
  for ``round`` (Hubara, Courbariaux, Soudry, El-Yaniv & Bengio, "Quantized neural
  networks", 2017: the family), so ``dv_hat/dv = 1`` inside the clip range and 0 outside,
  and ``dv_hat/ds = round(v/s) - v/s`` inside, ``-qn`` / ``qp`` outside; the step's
  gradient is scaled by ``g = 1 / sqrt(N * qp)`` (``N``: elements of a weight, or of one
  sample's activation), and the step starts at ``2 * mean|v| / sqrt(qp)`` (LSQ's rule; over
  the non-zero elements, so pruned zeros do not shrink it). Signed quantizers are
  symmetric (weights; activations that can be negative), unsigned ones serve non-negative
  activations (after a ReLU).
- :class:`LogQuantizer`: power-of-two levels (Miyashita, Lee & Murmann, "Convolutional
  neural networks using logarithmic data representation", 2016): code ``c`` stands for
  ``sign(c) * s * 2**(|c| - qmax)`` and code 0 for zero; ``|c| = clip(round(log2(|v|/s))
  + qmax, 0, qmax)`` rounds in the log domain (values below ``s * 2**(0.5 - qmax)`` become
  0, values above ``s`` clip to ``s``). The scale ``s`` is learned LSQ-style (same
  straight-through estimator and gradient scale) and starts at ``max|v|``.

Both are plain ``nn.Module`` s: ``forward(v)`` fake-quantizes (straight-through in
training, exact in eval or without grad), :meth:`codes` / :meth:`values` convert to and
from the integer codes, and a quantizer whose step is still 0 sets it from the first
tensor it sees (``init="lsq"`` rule or ``"mse"``: the step among a grid around it with
the least squared error).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from nncompress.errors import RecipeError

__all__ = [
    "INITS",
    "MAX_BITS",
    "MIN_BITS",
    "QUANTIZERS",
    "LinearQuantizer",
    "LogQuantizer",
    "Quantizer",
    "from_codes",
    "grad_scale",
    "linear_codes",
    "linear_values",
    "log_codes",
    "log_values",
    "make_quantizer",
    "qmax_of",
    "ste_round",
    "to_codes",
]

MIN_BITS, MAX_BITS = 2, 8
#: Step initialisations: LSQ's rule (log: max |v|), or the least-squared-error step.
INITS = ("lsq", "mse")
_TINY = 1e-12
#: The "mse" search: the rule's step times 2**(k/8) for k in this range.
_MSE_GRID = range(-32, 9)


def qmax_of(bits: int, signed: bool) -> int:
    """Largest code: ``2**(bits-1) - 1`` signed (symmetric), ``2**bits - 1`` unsigned."""
    return 2 ** (bits - 1) - 1 if signed else 2**bits - 1


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` whose gradient is the identity (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` in the forward pass, its gradient multiplied by ``scale`` (LSQ's ``g``)."""
    return (x - x * scale).detach() + x * scale


def linear_codes(v: torch.Tensor, step: torch.Tensor, qmax: int, signed: bool) -> torch.Tensor:
    """``clip(round(v / step), -qmax or 0, qmax)`` as int32."""
    r = torch.round(v / step.clamp_min(_TINY))
    return r.clamp(-qmax if signed else 0, qmax).to(torch.int32)


def linear_values(codes: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``codes * step`` (float32)."""
    return codes.to(torch.float32) * step.clamp_min(_TINY)


#: float32 mantissa bits of the smallest significand above sqrt(2): ``|x| = 2**e * 1.m``
#: rounds up in the log domain exactly when ``m >= _HALF_OCTAVE``.
_HALF_OCTAVE = 0x3504F4
#: Below this exponent powers of two are float32 denormals: they count as 0.
_MIN_EXPONENT = -126


def round_log2(a: torch.Tensor) -> torch.Tensor:
    """``round(log2(a))`` of non-negative ``a`` as int32, read from the float32 exponent and
    mantissa bits (as exact as ``log2`` and much faster on CPUs without a vector ``log``);
    0 and denormals give ``-2**20``."""
    bits = a.to(torch.float32).contiguous().view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    rounded = exponent - 127 + ((bits & 0x7FFFFF) >= _HALF_OCTAVE).to(torch.int32)
    return torch.where(exponent == 0, torch.full_like(rounded, -(1 << 20)), rounded)


def log_codes(v: torch.Tensor, scale: torch.Tensor, qmax: int, signed: bool) -> torch.Tensor:
    """Signed codes ``sign(v) * clip(round(log2(|v| / scale)) + qmax, 0, qmax)`` (int32);
    unsigned quantizers map negative values to 0."""
    with torch.no_grad():
        r = v / scale.clamp_min(_TINY)
        if not signed:
            r = r.clamp_min(0.0)
        m = (round_log2(r.abs()) + qmax).clamp(0, qmax)
        return torch.sign(r).to(torch.int32) * m


def log_values(codes: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """``sign(c) * scale * 2**(|c| - qmax)``, 0 for code 0 (float32; levels below float32's
    normal range, 2**-126, count as 0)."""
    c = codes.to(torch.int32)
    exponent = c.abs() - qmax
    magnitude = torch.exp2(exponent.clamp_min(_MIN_EXPONENT).to(torch.float32))
    zero = (c == 0) | (exponent < _MIN_EXPONENT)
    out = torch.sign(c).to(torch.float32) * magnitude * scale.clamp_min(_TINY)
    return torch.where(zero, torch.zeros_like(out), out)


def to_codes(kind: str, v: torch.Tensor, step: torch.Tensor, qmax: int,
             signed: bool) -> torch.Tensor:
    """Codes of ``v`` for quantizer ``kind`` ("linear" or "log")."""
    if kind == "log":
        return log_codes(v, step, qmax, signed)
    return linear_codes(v, step, qmax, signed)


def from_codes(kind: str, codes: torch.Tensor, step: torch.Tensor, qmax: int) -> torch.Tensor:
    """Values of ``codes`` for quantizer ``kind`` ("linear" or "log")."""
    if kind == "log":
        return log_values(codes, step, qmax)
    return linear_values(codes, step)


class Quantizer(nn.Module):
    """Shared parts of the two quantizers: bits, sign, the learned ``step`` (a 0-dim
    parameter; 0 means "not yet initialised") and LSQ's gradient scale.

    ``batched``: the first dimension of the tensors it sees is the batch (activations), so
    ``N`` in the gradient scale counts one sample's elements.
    """

    kind: ClassVar[str]

    def __init__(self, bits: int, signed: bool = True, batched: bool = False,
                 init: str = "lsq") -> None:
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or not (
                MIN_BITS <= bits <= MAX_BITS):
            raise RecipeError(f"quantizer bits must be an integer in {MIN_BITS}..{MAX_BITS}, "
                              f"got {bits!r}")
        if init not in INITS:
            raise RecipeError(f"quantizer init must be one of {', '.join(INITS)}, got {init!r}")
        self.bits, self.signed, self.batched, self.init = bits, bool(signed), bool(batched), init
        self.step = nn.Parameter(torch.zeros(()))
        self._ready = False

    @property
    def qmax(self) -> int:
        return qmax_of(self.bits, self.signed)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, batched={self.batched}"

    def codes(self, v: torch.Tensor, step: torch.Tensor | None = None) -> torch.Tensor:
        """Integer codes of ``v`` (int32), with the learned step unless ``step`` is given."""
        raise NotImplementedError

    def values(self, codes: torch.Tensor, step: torch.Tensor | None = None) -> torch.Tensor:
        """The real values of integer ``codes`` (float32)."""
        raise NotImplementedError

    def _step(self, step: torch.Tensor | None) -> torch.Tensor:
        return self.step.detach() if step is None else step

    def _fake(self, v: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """Straight-through fake quantization of ``v`` with the (gradient-scaled) step."""
        raise NotImplementedError

    def rule_step(self, v: torch.Tensor) -> float:
        """The paper's initial step for ``v``."""
        raise NotImplementedError

    def initialise(self, v: torch.Tensor, init: str | None = None) -> None:
        """Set the step from ``v`` (``init``: "lsq" rule or "mse" search; default the
        quantizer's own)."""
        v = v.detach().float()
        step = self.rule_step(v)
        if (init or self.init) == "mse":
            step = self.mse_step(v, step)
        with torch.no_grad():
            self.step.fill_(step)
        self._ready = True

    def mse_step(self, v: torch.Tensor, around: float) -> float:
        """The step among ``around * 2**(k/8)`` giving the least squared error on ``v``."""
        flat = v.reshape(-1)
        if flat.numel() > 1 << 16:
            flat = flat[torch.linspace(0, flat.numel() - 1, 1 << 16).long()]
        best, best_err = around, math.inf
        for k in _MSE_GRID:
            step = torch.tensor(around * 2.0 ** (k / 8))
            err = float(((self.values(self.codes(flat, step), step) - flat) ** 2).sum())
            if err < best_err:
                best, best_err = float(step), err
        return best

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """Fake-quantized ``v``: straight-through in training, exact otherwise."""
        if not self._ready:
            if float(self.step.detach()) <= 0.0:
                self.initialise(v)
            self._ready = True
        if not (self.training and torch.is_grad_enabled()):
            return self.values(self.codes(v)).to(v.dtype)
        n = v[0].numel() if self.batched and v.dim() > 0 else v.numel()
        step = grad_scale(self.step.clamp_min(_TINY), 1.0 / math.sqrt(max(n, 1) * self.qmax))
        return self._fake(v, step)


class LinearQuantizer(Quantizer):
    """Uniform levels ``step * c`` with a step learned by LSQ (Esser et al. 2020)."""

    kind = "linear"

    def codes(self, v: torch.Tensor, step: torch.Tensor | None = None) -> torch.Tensor:
        return linear_codes(v, self._step(step), self.qmax, self.signed)

    def values(self, codes: torch.Tensor, step: torch.Tensor | None = None) -> torch.Tensor:
        return linear_values(codes, self._step(step))

    def _fake(self, v: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        r = (v / step).clamp(-self.qmax if self.signed else 0, self.qmax)
        return ste_round(r) * step

    def rule_step(self, v: torch.Tensor) -> float:
        """LSQ: ``2 * mean|v| / sqrt(qmax)`` over the non-zero elements."""
        nonzero = v[v != 0].abs()
        mean = float(nonzero.mean()) if nonzero.numel() else 1.0
        return max(2.0 * mean / math.sqrt(self.qmax), _TINY)


class LogQuantizer(Quantizer):
    """Power-of-two levels ``sign * s * 2**-j`` and zero (Miyashita et al. 2016), the scale
    learned LSQ-style."""

    kind = "log"

    def codes(self, v: torch.Tensor, step: torch.Tensor | None = None) -> torch.Tensor:
        return log_codes(v, self._step(step), self.qmax, self.signed)

    def values(self, codes: torch.Tensor, step: torch.Tensor | None = None) -> torch.Tensor:
        return log_values(codes, self._step(step), self.qmax)

    def _fake(self, v: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        r = (v / step).clamp(-1.0 if self.signed else 0.0, 1.0)
        with torch.no_grad():
            q = log_values(log_codes(r, torch.ones(()), self.qmax, self.signed),
                           torch.ones(()), self.qmax)
        return (r + (q - r).detach()) * step

    def rule_step(self, v: torch.Tensor) -> float:
        """The largest level at the largest magnitude: ``max|v|``."""
        top = float(v.abs().max()) if v.numel() else 0.0
        return top if top > 0 else 1.0


#: quantizer kind -> class (the ``quantizer`` option of low-bit layers).
QUANTIZERS: dict[str, type[Quantizer]] = {"linear": LinearQuantizer, "log": LogQuantizer}


def make_quantizer(kind: str, bits: int, *, signed: bool = True, batched: bool = False,
                   init: str = "lsq") -> Quantizer:
    """A :class:`LinearQuantizer` or :class:`LogQuantizer` by ``kind``."""
    if kind not in QUANTIZERS:
        raise RecipeError(f"quantizer must be one of {', '.join(QUANTIZERS)}, got {kind!r}")
    return QUANTIZERS[kind](bits, signed=signed, batched=batched, init=init)
