"""Fake quantization for quantization-aware training (Jacob et al., 2018, section 3).

Jacob, Kligys, Chen, Zhu, Tang, Howard, Adam & Kalenichenko (2018), "Quantization and
training of neural networks for efficient integer-arithmetic-only inference", section 3:
the forward pass of training sees every weight and activation exactly as the integer model
will (quantized, then dequantized, in float), while the backward pass treats the rounding
as the identity (the straight-through estimator, Bengio et al., 2013) inside the
representable range and as a constant (zero gradient) outside it:

- activations: :class:`FakeQuantize`, asymmetric int8 ``[-128, 127]``
  (:func:`~nncompress.quant.affine.activation_qtype`) over a range learned as an
  exponential moving average of each training batch's min / max (section 3.1: "smoothed
  across thousands of training steps"), optionally frozen after some steps and off during
  the first ``delay`` steps (section 3.1: quantization of activations is disabled at the
  start of training);
- weights: :func:`fake_quant_weight`, symmetric int8 ``[-127, 127]`` with
  :func:`~nncompress.quant.affine.weight_scales` (per output channel by default).

Dequantization is ``float(q - Z) * float(S)`` in the tensor's dtype, the
:mod:`nncompress.quant.program` ``dequantize`` op, so a trained model's forward pass is what
its converted integer program computes between layers.
"""

from __future__ import annotations

import torch
from torch import nn

from nncompress.errors import RecipeError
from nncompress.quant.affine import (
    QMAX,
    QMIN,
    WMAX,
    QType,
    activation_qtype,
    quantize_tensor,
    weight_scales,
)

__all__ = ["FakeQuantize", "fake_quant_weight", "fake_quantize"]


class _StraightThrough(torch.autograd.Function):
    """Forward: the given quantized-dequantized tensor. Backward: the incoming gradient
    where ``inside`` is true (all of it when ``inside`` is None), zero elsewhere."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor,
                dequantized: torch.Tensor, inside: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(inside if inside is not None else torch.ones(()).bool())
        return dequantized

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx,
                 grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inside,) = ctx.saved_tensors
        return grad * inside.to(grad.dtype), None, None


def fake_quantize(x: torch.Tensor, qtype: QType) -> torch.Tensor:
    """``x`` quantized to the int8 ``qtype`` and dequantized (same shape and dtype), with
    the straight-through gradient: passed where ``x`` lies in the representable range
    ``[S (-128 - Z), S (127 - Z)]``, zero outside it."""
    scale, zero = qtype.scale, qtype.zero_point
    q = quantize_tensor(x.detach(), scale, zero)
    dequantized = (q - zero).to(x.dtype) * torch.tensor(scale, dtype=x.dtype)
    lo, hi = (QMIN - zero) * scale, (QMAX - zero) * scale
    inside = (x.detach() >= lo) & (x.detach() <= hi)
    return _StraightThrough.apply(x, dequantized, inside)


def fake_quant_weight(weight: torch.Tensor, per_channel: bool = True) -> torch.Tensor:
    """``weight`` quantized symmetrically to int8 ``[-127, 127]`` with
    :func:`~nncompress.quant.affine.weight_scales` (per output channel, dim 0, or one scale
    when ``per_channel`` is false or the tensor has fewer than 2 dims) and dequantized, with
    the straight-through gradient (every weight lies in its range: the identity)."""
    channels = per_channel and weight.dim() >= 2
    scales = weight_scales(weight, per_channel=channels)            # float64 [C] or [1]
    shape = (-1,) + (1,) * (weight.dim() - 1) if channels else ()
    scales = scales.reshape(shape) if channels else scales.reshape(())
    q = quantize_tensor(weight.detach(), scales, 0, -WMAX, WMAX)
    dequantized = q.to(weight.dtype) * scales.to(weight.dtype)
    return _StraightThrough.apply(weight, dequantized, None)


def _check(value: object, what: str, lo: float, hi: float | None, integer: bool) -> None:
    """Raise RecipeError unless ``value`` is a number (an int if ``integer``) in [lo, hi]."""
    kinds = (int,) if integer else (int, float)
    bad = isinstance(value, bool) or not isinstance(value, kinds) or not lo <= value \
        or (hi is not None and value > hi)
    if bad:
        kind = "an integer" if integer else "a number"
        raise RecipeError(f"FakeQuantize {what} must be {kind} in "
                          f"[{lo}, {'inf' if hi is None else hi}], got {value!r}")


class FakeQuantize(nn.Module):
    """An activation fake-quantizer (Jacob et al., 2018, section 3.1).

    In training mode each batch updates the range ``[lo, hi]`` as an exponential moving
    average of the batch's min / max (``new = (1 - momentum) old + momentum batch``; the
    first batch sets it), unless frozen: after ``freeze_after`` observed batches the range
    stays as it is. The output is :func:`fake_quantize` of the input with :meth:`qtype`
    once at least ``max(1, delay)`` batches were observed, the input itself before (no
    range known yet, or quantization delayed). In eval mode the range never changes.
    ``lo``, ``hi`` (float32 scalars) and ``steps`` (int64) are buffers (saved in
    ``state_dict``). Non-finite values are ignored by the observer.
    """

    def __init__(self, momentum: float = 0.01, freeze_after: int | None = None,
                 delay: int = 0) -> None:
        super().__init__()
        _check(momentum, "momentum", 0.0, 1.0, integer=False)
        if momentum == 0:
            raise RecipeError("FakeQuantize momentum must be > 0, got 0")
        if freeze_after is not None:
            _check(freeze_after, "freeze_after", 1, None, integer=True)
        _check(delay, "delay", 0, None, integer=True)
        self.momentum = float(momentum)
        self.freeze_after = freeze_after
        self.delay = delay
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    @property
    def frozen(self) -> bool:
        """Whether the range no longer moves in training."""
        return self.freeze_after is not None and int(self.steps) >= self.freeze_after

    def qtype(self) -> QType:
        """The int8 type of the current range (widened to include 0)."""
        return activation_qtype(float(self.lo), float(self.hi))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """One EMA step on the finite values of ``x`` (none: no step)."""
        values = x.detach().reshape(-1)
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            values = values[finite]
        if not values.numel():
            return
        batch_lo, batch_hi = values.min().float(), values.max().float()
        if int(self.steps) == 0:
            self.lo.copy_(batch_lo)
            self.hi.copy_(batch_hi)
        else:
            self.lo.add_(self.momentum * (batch_lo - self.lo))
            self.hi.add_(self.momentum * (batch_hi - self.hi))
        self.steps.add_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.frozen:
            self.observe(x)
        if int(self.steps) < max(1, self.delay):
            return x
        return fake_quantize(x, self.qtype())

    def extra_repr(self) -> str:
        return (f"momentum={self.momentum}, freeze_after={self.freeze_after}, "
                f"delay={self.delay}, range=[{float(self.lo):.4g}, {float(self.hi):.4g}], "
                f"steps={int(self.steps)}")
