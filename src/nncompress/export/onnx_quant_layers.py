"""ONNX stand-ins for the binary and low-bit layers: plain float ONNX ops with each layer's
own arithmetic, registered in :data:`nncompress.export.LAYER_FORMS` (the ``onnx:module``
exporter swaps them in on a copy of the model, then PyTorch's TorchScript exporter traces).

- Binary layers (Courbariaux, Hubara et al., 2016, "Binarized neural networks"; Rastegari
  et al., 2016, "XNOR-Net"): the input binarization ``sign(x - t)`` becomes
  ``Where(x - t < 0, -1, +1)`` (``Sign`` would give 0 at 0; the layers give +1). A frozen
  layer with binary inputs becomes a float MatMul / Conv of +-1 inputs with its +-1
  weights -- every product and partial sum is a small integer, so the sum is exact in
  float32 whatever order ONNX Runtime adds in, the same integers the XNOR-popcount kernel
  counts -- followed by ``* alpha + bias`` (one float32 rounding each, as in the layer):
  ONNX Runtime's outputs equal the layer's bit for bit. Layers with real-valued inputs (and
  the latent training forms, exported before ``freeze()``) compute ``x . (sign(W) alpha)``
  in float, like their own forward, so the export matches them to float32 rounding of the
  sums (a few ulp of the output's magnitude).
- Low-bit layers (Hubara et al., 2017, "Quantized neural networks"; Esser et al., 2020,
  LSQ; Miyashita, Lee & Murmann, 2016, logarithmic quantization): the weight is the one the
  layer dequantizes from its codes (``code * step``, or ``sign(c) * step * 2**(|c|-qmax)``
  for log codes) as a float constant; the input quantization is written with ONNX ops:
  linear ``clip(round(x / step), lo, qmax) * step`` (``Round`` rounds half to even like
  ``torch.round``), log ``sign(r) * 2**L * step`` with ``L = round(log2|r|)`` found exactly
  (``Log`` guesses the octave, comparisons against exact powers of two correct it, and the
  half-octave threshold is :mod:`nncompress.quant.lsq`'s own float32 significand). The
  quantized inputs are thus identical; only the float sums of the layer may round
  differently (float32 rounding, as above).

Tolerance, against the torch model's own forward: each layer alone, float32 rounding of
its sums only (bit-exact for frozen binary layers with binary inputs; measured <= 6e-7 of
the largest output on the reference models). In a model, a layer that quantizes (or
binarizes) its input can see an upstream sum that rounded differently land on the other
side of a level boundary: that input moves one level, and the output by about one step
times the weights it meets. Measured on the test sets (digits mlp, 360 samples; mnist1d
cnn1d, 1000), 3-bit weights with 4- or 8-bit inputs: max |diff| <= 1.5e-3 of the largest
output, on <= 0.7% of the samples, argmax identical on every sample; binarized models and
low-bit ones with float inputs: <= 6e-7 relative. The tests bound layers by ``1e-5`` and
models by ``5e-3`` of the largest output, with the same argmax.
PyTorch's exporter writes the weights as float32 constants; as they hold at most ``2**k``
values, the float exporter's codebook pass (:mod:`nncompress.export.onnx_codebook`) stores
each as a float codebook plus one uint8 index per weight, about 4x smaller than float32
(not 1- or k-bit packed: ONNX has no sub-byte tensors a standard operator reads), and ONNX
Runtime folds it back into the dense weight when it loads the file.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nncompress.errors import UnsupportedLayerError
from nncompress.export import LAYER_FORMS, qualified_name
from nncompress.quant import binary_layers as bl
from nncompress.quant import lowbit_layers as ll
from nncompress.quant.lsq import _HALF_OCTAVE, _MIN_EXPONENT, _TINY, qmax_of

__all__ = ["ChannelAffine", "InputLinearQuant", "InputLogQuant", "InputSign",
           "QuantLayerStandIn", "binary_stand_in", "latent_binary_stand_in",
           "latent_lowbit_stand_in", "log_levels", "lowbit_stand_in"]

#: ``1.m`` of the smallest float32 significand that rounds up an octave (lsq.round_log2).
_ROUND_UP = 1.0 + _HALF_OCTAVE / 2.0**23
#: The smallest normal float32; smaller magnitudes count as 0 (lsq.round_log2).
_NORMAL = 2.0**_MIN_EXPONENT


def _channel_shape(dims: int) -> tuple[int, ...]:
    """Shape broadcasting a ``[C]`` vector over ``[B, C, *spatial]`` (dims 0: ``[..., C]``)."""
    return (-1,) if dims == 0 else (1, -1) + (1,) * dims


class InputSign(nn.Module):
    """``+1`` where ``x - t >= 0`` else ``-1`` (``t``: ``[C]`` per feature / channel)."""

    def __init__(self, threshold: torch.Tensor, dims: int) -> None:
        super().__init__()
        self.register_buffer("threshold", threshold.detach().float().reshape(
            _channel_shape(dims)).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x - self.threshold < 0, -1.0, 1.0)


class InputLinearQuant(nn.Module):
    """Uniform input levels: ``clip(round(x / step), -qmax or 0, qmax) * step``."""

    def __init__(self, step: torch.Tensor, qmax: int, signed: bool) -> None:
        super().__init__()
        self.register_buffer("step", step.detach().float().clamp_min(_TINY).reshape(()))
        self.low, self.high = float(-qmax if signed else 0), float(qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x / self.step).clamp(self.low, self.high) * self.step


def log_levels(r: torch.Tensor, qmax: int) -> torch.Tensor:
    """``sign(r) * 2**min(round_log2|r|, 0)``, 0 where ``round_log2|r| <= -qmax`` or
    ``|r|`` is below float32's normal range: :func:`nncompress.quant.lsq.log_values` of
    ``log_codes(r, 1, qmax)`` with ONNX-exportable ops only (no bit casts)."""
    a = r.abs().clamp(max=1.0)            # |r| >= 1 rounds to level 1 either way
    tiny = a < _NORMAL
    safe = torch.where(tiny, 1.0, a)
    p = torch.pow(2.0, torch.floor(torch.log2(safe)))   # 2**floor(log2 a), maybe off by one
    p = torch.where(safe < p, p * 0.5, p)
    p = torch.where(safe >= p * 2.0, p * 2.0, p)          # now p <= a < 2p exactly
    level = torch.where(safe >= p * _ROUND_UP, p * 2.0, p)
    if qmax <= -_MIN_EXPONENT:            # 2**-qmax normal: levels at or below it are 0
        tiny = tiny | (level <= 2.0**-qmax)
    return torch.where(tiny, 0.0, torch.sign(r) * level)


class InputLogQuant(nn.Module):
    """Power-of-two input levels (Miyashita et al., 2016): ``log_levels(x / s) * s``."""

    def __init__(self, step: torch.Tensor, qmax: int, signed: bool) -> None:
        super().__init__()
        self.register_buffer("step", step.detach().float().clamp_min(_TINY).reshape(()))
        self.qmax, self.signed = int(qmax), bool(signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = x / self.step
        if not self.signed:
            r = r.clamp(min=0.0)
        return log_levels(r, self.qmax) * self.step


class ChannelAffine(nn.Module):
    """``y * alpha + bias`` per output channel (a frozen binary layer's scaling)."""

    def __init__(self, alpha: torch.Tensor, bias: torch.Tensor | None, dims: int) -> None:
        super().__init__()
        shape = _channel_shape(dims)
        self.register_buffer("alpha", alpha.detach().float().reshape(shape).clone())
        self.register_buffer("shift", None if bias is None
                             else bias.detach().float().reshape(shape).clone())

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        # constants first: ONNX Runtime folds ``Conv -> Mul(y, const)`` / ``Add(y, const)``
        # into the Conv's weights and bias (ConvMulFusion / ConvAddFusion), which would
        # turn the exact integer sums into float sums of +-alpha; Mul(const, y) is left be.
        y = self.alpha * y
        return y if self.shift is None else self.shift + y


class QuantLayerStandIn(nn.Module):
    """``post(core(pre(x)))``: input quantization, a float Linear / Conv holding the
    layer's effective weight, and an optional per-channel scaling."""

    def __init__(self, pre: nn.Module, core: nn.Module, post: nn.Module) -> None:
        super().__init__()
        self.pre, self.core, self.post = pre, core, post

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.core(self.pre(x)))


def _float_core(layer: Any, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A float ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` with ``layer``'s geometry
    (padding mode included) holding ``weight`` and ``bias``."""
    has_bias = bias is not None
    if isinstance(layer, nn.Linear):
        core: Any = nn.utils.skip_init(nn.Linear, layer.in_features, layer.out_features,
                                       bias=has_bias)
    else:
        cls = nn.Conv1d if isinstance(layer, nn.Conv1d) else nn.Conv2d
        core = nn.utils.skip_init(cls, layer.in_channels, layer.out_channels,
                                  layer.kernel_size, stride=layer.stride,
                                  padding=layer.padding, dilation=layer.dilation,
                                  groups=layer.groups, bias=has_bias,
                                  padding_mode=getattr(layer, "padding_mode", "zeros"))
    with torch.no_grad():
        core.weight = nn.Parameter(weight.detach().float().clone(), requires_grad=False)
        if bias is not None:
            core.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
    return core.eval()


def _dims(layer: nn.Module) -> int:
    return 0 if isinstance(layer, nn.Linear) else 1 if isinstance(layer, nn.Conv1d) else 2


def binary_stand_in(layer: Any) -> nn.Module:
    """A frozen binary layer (``FrozenBinary*``): with binary inputs, ``Where`` sign, the +-1
    float MatMul / Conv (exact integer sums) and ``* alpha + bias``; without, the float
    layer with weight ``sign(W) * alpha`` (its reference path)."""
    dims = _dims(layer)
    if layer.threshold is None:
        return QuantLayerStandIn(nn.Identity(), _float_core(
            layer, layer.scaled_weight(torch.float32), layer.bias), nn.Identity())
    return QuantLayerStandIn(InputSign(layer.threshold, dims),
                             _float_core(layer, layer.weight.float(), None),
                             ChannelAffine(layer.alpha, layer.bias, dims))


def latent_binary_stand_in(layer: Any) -> nn.Module:
    """A training-form binary layer (``BinaryLinear`` / ``BinaryConv*``) as it runs in eval:
    ``sign(x - t)`` (with binary inputs), then the float layer with weight
    ``sign(W) * alpha`` (``alpha = mean |W|`` per output with scaling, else 1)."""
    with torch.no_grad():
        signs = torch.where(layer.weight < 0, -1.0, 1.0).to(layer.weight.dtype)
        weight = signs * layer.alpha().reshape((-1,) + (1,) * (signs.dim() - 1))
    pre = nn.Identity() if layer.threshold is None else InputSign(layer.threshold,
                                                                   _dims(layer))
    return QuantLayerStandIn(pre, _float_core(layer, weight, layer.bias), nn.Identity())


def _input_quant(layer: Any) -> nn.Module:
    """The frozen low-bit layer's input quantization, or Identity (float inputs)."""
    if layer.activation_bits is None or layer.input_step is None:
        return nn.Identity()
    qmax = qmax_of(layer.activation_bits, layer.act_signed)
    kind = InputLogQuant if layer.quantizer == "log" else InputLinearQuant
    return kind(layer.input_step, qmax, layer.act_signed)


def lowbit_stand_in(layer: Any) -> nn.Module:
    """A frozen low-bit layer (``FrozenLowBit*``): its input quantization in ONNX ops, then
    the float layer holding the weight its codes stand for."""
    with torch.no_grad():
        weight = layer.dequantized_weight(torch.float32)
    return QuantLayerStandIn(_input_quant(layer), _float_core(layer, weight, layer.bias),
                             nn.Identity())


def latent_lowbit_stand_in(layer: Any) -> nn.Module:
    """A training-form low-bit layer (``LowBit*``) as it runs in eval: the stand-in of its
    frozen form (same codes, steps and outputs). Refused while its input step is unset
    (the first forward pass would set it)."""
    quant = layer.input_quant
    if quant is not None and float(quant.step.detach()) <= 0.0:
        raise UnsupportedLayerError(f"cannot export {type(layer).__name__} to ONNX: its "
                                    "input step is not set yet (run it once, or freeze it)")
    with torch.no_grad():
        return lowbit_stand_in(layer.freeze())


def _register() -> None:
    forms = {
        binary_stand_in: (bl.FrozenBinaryLinear, bl.FrozenBinaryConv1d, bl.FrozenBinaryConv2d),
        latent_binary_stand_in: (bl.BinaryLinear, bl.BinaryConv1d, bl.BinaryConv2d),
        lowbit_stand_in: (ll.FrozenLowBitLinear, ll.FrozenLowBitConv1d,
                          ll.FrozenLowBitConv2d),
        latent_lowbit_stand_in: (ll.LowBitLinear, ll.LowBitConv1d, ll.LowBitConv2d),
    }
    for make, classes in forms.items():
        for cls in classes:
            LAYER_FORMS.register(f"onnx:{qualified_name(cls)}", make)


_register()
