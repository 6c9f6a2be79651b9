"""Conversion rules of the frozen binary layers (:mod:`nncompress.quant.binary_layers`).

Courbariaux, Hubara, Soudry, El-Yaniv & Bengio (2016), "Binarized neural networks", and
Rastegari, Ordonez, Redmon & Farhadi (2016), "XNOR-Net": a frozen binary layer computes
``out[o] = alpha[o] * sum_i a_i sign(W)[o, i] + bias[o]`` with ``a`` its input, or
``sign(x - t)`` (``-1`` where ``x - t < 0``, else ``+1``: a tie gives ``+1``) when it
binarizes its input. In the integer program that is

- with binary inputs, a ``sign`` op: int8 ``q`` -> ``1 if q >= T[c] else -1`` (scale 1,
  zero-point 0) whose integer thresholds ``T`` are found by evaluating the float layer's
  own test on the dequantized value of every int8 level (:func:`sign_thresholds`), so it
  equals ``sign(dequant(q) - t)`` exactly;
- a ``linear`` / ``conv`` op whose int8 weights are the signs (+-1) at per-channel weight
  scale ``alpha``, so the usual requantization applies (Jacob et al., 2018): ``M[o] =
  S_in alpha[o] / S_out``, the bias in int32 at ``S_in alpha[o]``. A channel whose alpha
  is 0 gets zero weights (its output is its bias, as in the float layer).

A BatchNorm after a binary layer is folded first, as for any layer (``fold_batchnorm``:
into ``alpha`` and the bias, see ``FrozenBinaryLinear.fold_affine``). The C engine stores
such weights at 1 bit each and runs XNOR-popcount where the input comes from a ``sign`` op
(:mod:`nncompress.kernels.int8_emit_binary`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from nncompress.quant.affine import QMAX, QMIN, QType
from nncompress.quant.binary_layers import (
    FrozenBinaryConv1d,
    FrozenBinaryConv2d,
    FrozenBinaryLinear,
)
from nncompress.quant.convert_rules import Builder

__all__ = ["BINARY_RULES", "SIGN_QTYPE", "sign_thresholds"]

#: The qtype of a ``sign`` op's output: the +-1 values themselves.
SIGN_QTYPE = QType("int8", 1.0, 0)


def sign_thresholds(threshold: torch.Tensor, qx: QType) -> torch.Tensor:
    """int16 ``[C]``: per channel the least int8 level ``q`` whose dequantized value ``x``
    (``float32(q - zx) * float32(sx)``, as the reference) has ``x - t >= 0`` in float32,
    i.e. not ``x - t < 0``; 128 where no level does, -128 where all do (also a NaN
    threshold, whose comparison is false). Exact: ``x - t`` is monotone in ``q``."""
    levels = torch.arange(QMIN, QMAX + 1, dtype=torch.int64)
    real = (levels - qx.zero_point).to(torch.float32) * torch.tensor(qx.scale,
                                                                     dtype=torch.float32)
    negative = (real[None, :] - threshold.detach().float().reshape(-1, 1)) < 0   # [C, 256]
    return (QMIN + negative.sum(dim=1)).to(torch.int16)


def _weights(b: Builder, node: fx.Node, layer: Any
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The int8 +-1 weights, their scales (alpha, float64; a channel whose alpha is 0 gets
    zero weights at scale 1, its output being its bias) and the float bias."""
    w = layer.weight.detach().to(torch.int8).clone()
    alpha = layer.alpha.detach().double()
    bias = layer.bias.detach().double() if layer.bias is not None else None
    if not bool(torch.isfinite(alpha).all()) or (bias is not None
                                                 and not bool(torch.isfinite(bias).all())):
        b.fail(node, "has a non-finite alpha or bias")
    zero = alpha <= 0
    w[zero] = 0
    return w, torch.where(zero, torch.ones_like(alpha), alpha), bias


def _binary(b: Builder, node: fx.Node) -> None:
    """A frozen binary Linear / Conv1d / Conv2d: an optional ``sign`` op, then the
    requantized ``linear`` / ``conv`` on +-1 weights."""
    layer: Any = b.gm.get_submodule(node.target)
    kind = "linear" if isinstance(layer, nn.Linear) else "conv"
    attrs = b.conv_attrs(node, layer) if kind == "conv" else {}
    x = b.value(node, node.args[0])
    if layer.threshold is not None:
        axis = b.ndim(node.args[0].name) - 1 if kind == "linear" else 1
        t = sign_thresholds(layer.threshold, b.values[x])
        x = b.emit("sign", node, [x], SIGN_QTYPE, {"axis": axis}, {"t": t},
                   out=f"{node.name}.sign")
    w, ws, bias = _weights(b, node, layer)
    b.requantized(node, kind, x, w, ws, bias, attrs)


#: Frozen binary layer type -> rule (merged into ``convert_ops.RULES``).
BINARY_RULES: dict[Any, Callable[[Builder, fx.Node], None]] = {
    FrozenBinaryLinear: _binary, FrozenBinaryConv1d: _binary, FrozenBinaryConv2d: _binary,
}
