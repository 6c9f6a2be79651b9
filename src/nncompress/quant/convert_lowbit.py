"""Conversion of the frozen low-bit layers (:mod:`nncompress.quant.lowbit_layers`) to int8.

A frozen low-bit layer holds ``k``-bit integer codes (``k <= 8``) and one step ``s``:
uniform levels ``c * s`` (LSQ, Esser et al. 2020; Hubara et al. 2017) or power-of-two
levels ``sign(c) s 2^(|c| - qmax)`` (Miyashita, Lee & Murmann 2016). Both are int8 weights
at a per-channel scale (Jacob et al., 2018), so the layer becomes the program's usual
requantized ``linear`` / ``conv`` op:

- uniform codes ``|c| <= 127`` are the int8 weights themselves at scale ``s`` (exact);
- power-of-two codes of one output channel whose exponents span at most 6 octaves are
  ``sign(c) 2^(|c| - lo)`` at scale ``s 2^(lo - qmax)`` (``lo``: the channel's least
  nonzero ``|c|``; exact); a channel spanning more is requantized from its dequantized
  weights to int8 (``max|w| / 127``) and the log says how many channels were.

A layer that also quantizes its inputs (LSQ activations) keeps that quantization as a
``lut`` op before it: each int8 input level -> its value on the layer's input levels, in
int8 -- exact for uniform levels (the codes at scale ``s_in``; unsigned 8-bit codes with
zero-point -128), and for power-of-two levels exact on the top 7 octaves (scale
``s_in / 64``), lower levels rounded. Dropping it instead (the program's int8 activations
replacing the k-bit ones) was measured too: on the lowbit cnn1d 95.5 % test accuracy
(the low-bit model: 94.1 %) and 98.1 % argmax agreement, with the table 94.6 % and 97.7 %;
on a small 4-bit CNN fine-tuned 4 epochs (tests) 93.9 % agreement without the table, 96.5 % with
it. The table keeps the program the model the user measured.

A BatchNorm after such a layer folds into the per-channel scales (a negative factor flips
the codes' signs, exact): :func:`int8_forms` first swaps every frozen low-bit layer for an
:class:`Int8CodedLinear` / ``Conv1d`` / ``Conv2d`` (int8 weights, float64 per-channel
scales, ``fold_affine``), which ``fold_batchnorm`` folds into.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from nncompress.quant.affine import QMAX, QMIN, WMAX, QType, quantize_tensor, weight_scales
from nncompress.quant.convert_rules import Builder
from nncompress.quant.lowbit_layers import (
    FrozenLowBitConv1d,
    FrozenLowBitConv2d,
    FrozenLowBitLinear,
    describe_bits,
)
from nncompress.quant.lsq import from_codes, qmax_of, to_codes

__all__ = ["LOWBIT_RULES", "Int8CodedConv1d", "Int8CodedConv2d", "Int8CodedLinear",
           "int8_forms", "int8_weights"]

_FROZEN = (FrozenLowBitLinear, FrozenLowBitConv1d, FrozenLowBitConv2d)
#: conv attributes an int8-coded conv copies from the frozen layer it replaces
_CONV_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
               "transposed", "output_padding", "groups", "padding_mode",
               "_reversed_padding_repeated_twice")


#: power-of-two input levels kept by the lookup table: the top 7 octaves (1..64 at scale
#: ``s / 64``); lower levels round to the nearest multiple of ``s / 64``
_LOG_OCTAVES = 6


def _input_quantizer(layer: Any) -> InputLevels | None:
    """A frozen layer's input quantizer (None: float inputs)."""
    if layer.activation_bits is None or layer.input_step is None:
        return None
    signed = bool(layer.act_signed)
    return InputLevels(layer.quantizer, qmax_of(layer.activation_bits, signed), signed,
                       float(layer.input_step.detach().clamp_min(1e-12)))


@dataclass(frozen=True)
class InputLevels:
    """A layer's input quantizer: kind (``linear`` / ``log``), largest code, sign, step."""

    kind: str
    qmax: int
    signed: bool
    step: float

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the quantizer's levels (as the frozen layer computes it)."""
        step = torch.tensor(self.step, dtype=torch.float32)
        codes = to_codes(self.kind, x, step, self.qmax, self.signed)
        return from_codes(self.kind, codes, step, self.qmax).to(x.dtype)

    def qtype(self) -> QType:
        """Uniform codes at scale ``step`` (zero-point -128 for unsigned codes above 127);
        power-of-two levels at scale ``step / 64``."""
        if self.kind == "log":
            return QType("int8", self.step / 2**_LOG_OCTAVES, 0)
        return QType("int8", self.step, -128 if self.qmax > QMAX else 0)


def int8_weights(layer: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A frozen low-bit layer's weights as int8 ``[O, ...]`` at float64 scales ``[O]``, and
    how many output channels had to be requantized (0: the codes are used exactly)."""
    codes = layer.weight.detach().to(torch.int64)
    step = float(layer.weight_step.detach().clamp_min(1e-12))
    out = codes.shape[0]
    if layer.quantizer == "linear":
        return codes.to(torch.int8), torch.full((out,), step, dtype=torch.float64), 0
    qmax = qmax_of(layer.weight_bits, True)
    mags = codes.abs().flatten(1)
    lo = torch.where(mags > 0, mags, torch.full_like(mags, qmax + 1)).amin(dim=1)
    lo = lo.clamp_max(qmax)            # an all-zero channel: any scale
    shape = (-1,) + (1,) * (codes.dim() - 1)
    exponent = (codes.abs() - lo.reshape(shape)).clamp_min(0)
    ints = torch.sign(codes) * torch.exp2(exponent.double())
    scales = step * torch.exp2((lo - qmax).double())
    fits = ints.abs().flatten(1).amax(dim=1) <= WMAX
    if bool(fits.all()):
        return ints.to(torch.int8), scales, 0
    real = from_codes("log", layer.weight.detach(), layer.weight_step.detach(), qmax)
    fallback = weight_scales(real)
    requant = quantize_tensor(real, fallback.reshape(shape), 0, -WMAX, WMAX)
    keep = fits.reshape(shape)
    wq = torch.where(keep, ints.to(torch.int64), requant).to(torch.int8)
    return wq, torch.where(fits, scales, fallback), int((~fits).sum())


class _Int8Coded:
    """Body of the int8-coded layers: int8 ``weight`` at float64 ``scales`` ``[O]``."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    scales: torch.Tensor
    input_levels: InputLevels | None

    def _setup(self, frozen: Any) -> int:
        wq, scales, requantized = int8_weights(frozen)
        self.weight = nn.Parameter(wq, requires_grad=False)
        module: Any = self
        module.register_buffer("scales", scales)
        bias = frozen.bias
        module.register_parameter("bias", None if bias is None else nn.Parameter(
            bias.detach().float().clone(), requires_grad=False))
        self.input_levels = _input_quantizer(frozen)
        return requantized

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input on the layer's input levels, as the frozen layer computes it."""
        return x if self.input_levels is None else self.input_levels.apply(x)

    def real_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The float weight the int8 codes and scales stand for."""
        shape = (-1,) + (1,) * (self.weight.dim() - 1)
        return (self.weight.double() * self.scales.reshape(shape)).to(dtype)

    def fold_affine(self, scale: torch.Tensor, offset: torch.Tensor) -> None:
        """Fold ``y' = scale * y + offset`` per output channel (a BatchNorm in inference,
        Jacob et al. 2018, section 3.2) into the scales and bias; a negative factor flips
        the channel's codes (exact), a zero one zeroes them (the output is the bias)."""
        with torch.no_grad():
            factor = self.scales * scale.double()
            shape = (-1,) + (1,) * (self.weight.dim() - 1)
            sign = torch.sign(factor).to(torch.int8).reshape(shape)
            self.weight.copy_(self.weight * sign)
            self.scales.copy_(torch.where(factor == 0, torch.ones_like(factor), factor.abs()))
            bias = self.bias if self.bias is not None else torch.zeros_like(scale)
            module: Any = self
            module.bias = nn.Parameter((bias * scale + offset).float(), requires_grad=False)


class Int8CodedLinear(_Int8Coded, nn.Linear):
    """A frozen low-bit Linear as int8 ``weight`` ``[out, in]`` times ``scales`` ``[out]``."""

    def __init__(self, frozen: FrozenLowBitLinear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = frozen.in_features, frozen.out_features
        self.requantized = self._setup(frozen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.real_weight(x.dtype), self.bias)


class _Int8CodedConv(_Int8Coded):
    def __init__(self, frozen: Any) -> None:
        nn.Module.__init__(self)  # type: ignore[arg-type]
        for attr in _CONV_ATTRS:
            setattr(self, attr, getattr(frozen, attr))
        self.requantized = self._setup(frozen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m: Any = self
        return m._conv_forward(self.quantized_input(x), self.real_weight(x.dtype),
                               self.bias)


class Int8CodedConv1d(_Int8CodedConv, nn.Conv1d):
    """A frozen low-bit Conv1d as int8 ``weight`` ``[out, in / groups, k]`` times
    ``scales``."""


class Int8CodedConv2d(_Int8CodedConv, nn.Conv2d):
    """A frozen low-bit Conv2d as int8 ``weight`` ``[out, in / groups, kh, kw]`` times
    ``scales``."""


_CODED_OF: dict[type, type] = {FrozenLowBitLinear: Int8CodedLinear,
                               FrozenLowBitConv1d: Int8CodedConv1d,
                               FrozenLowBitConv2d: Int8CodedConv2d}


def _describe(name: str, layer: Any, requantized: int) -> list[str]:
    out = layer.weight.shape[0]
    how = (f"{requantized} of {out} channels requantized to int8 from the dequantized "
           "weights (their power-of-two codes span more than int8)" if requantized
           else "the codes used as int8 weights (exact)")
    lines = [f"int8: {name} ({describe_bits(layer)}): {how}"]
    levels = _input_quantizer(layer)
    if levels is not None:
        how = ("exact" if levels.kind == "linear" else f"exact for its top "
               f"{_LOG_OCTAVES + 1} octaves, lower levels rounded to 1/{2**_LOG_OCTAVES} of "
               "its step")
        lines.append(f"int8: {name}'s {layer.activation_bits}-bit input quantization kept as "
                     f"a lookup table (each int8 input level -> its quantized value; {how})")
    return lines


def _input_lut(b: Builder, node: fx.Node, x: str, levels: InputLevels) -> str:
    """A ``lut`` op: each int8 level of ``x`` -> its dequantized value put on the layer's
    input levels, in int8 at :meth:`InputLevels.qtype`."""
    qx, qo = b.values[x], levels.qtype()
    real = (torch.arange(QMIN, QMAX + 1, dtype=torch.int64) - qx.zero_point).to(
        torch.float32) * torch.tensor(qx.scale, dtype=torch.float32)
    table = quantize_tensor(levels.apply(real), qo.scale, qo.zero_point).to(torch.int8)
    return b.emit("lut", node, [x], qo, {}, {"table": table}, out=f"{node.name}.inq")


def int8_forms(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """``model`` with every frozen low-bit layer swapped for its int8-coded form (in place;
    a frozen layer at the root is returned swapped), and the log lines."""
    log: list[str] = []
    swaps = [(name, m) for name, m in model.named_modules() if type(m) in _CODED_OF]
    for name, layer in swaps:
        coded = _CODED_OF[type(layer)](layer)
        log.extend(_describe(name or type(model).__name__, layer, coded.requantized))
        if not name:
            return coded, log
        model.set_submodule(name, coded)
    return model, log


def _rule(b: Builder, node: fx.Node) -> None:
    """A frozen low-bit or int8-coded layer: the requantized ``linear`` / ``conv`` op on
    its int8 weights and per-channel scales."""
    layer: Any = b.gm.get_submodule(node.target)
    if isinstance(layer, _FROZEN):
        wq, scales, requantized = int8_weights(layer)
        b.log.extend(_describe(str(node.target), layer, requantized))
        levels = _input_quantizer(layer)
    else:
        wq, scales, levels = layer.weight.detach(), layer.scales.detach(), layer.input_levels
    kind = "linear" if isinstance(layer, nn.Linear) else "conv"
    attrs = b.conv_attrs(node, layer) if kind == "conv" else {}
    bias = None if layer.bias is None else layer.bias.detach().double()
    x = b.value(node, node.args[0])
    if levels is not None:
        x = _input_lut(b, node, x, levels)
    b.requantized(node, kind, x, wq, scales, bias, attrs)


#: frozen low-bit / int8-coded layer type -> rule (merged into ``convert_ops.RULES``).
LOWBIT_RULES: dict[Any, Callable[[Builder, fx.Node], None]] = {
    cls: _rule for cls in (*_FROZEN, Int8CodedLinear, Int8CodedConv1d, Int8CodedConv2d)}
