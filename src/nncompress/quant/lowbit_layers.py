"""Low-bit Linear / Conv1d / Conv2d: fake-quantized training forms and integer-code frozen forms.

Weights (and optionally inputs) at 2-8 bits with the quantizers of
:mod:`nncompress.quant.lsq`: uniform levels with an LSQ-learned step (Esser et al.,
"Learned step size quantization", 2020; Hubara et al., "Quantized neural networks", 2017)
or power-of-two levels (Miyashita, Lee & Murmann, "Convolutional neural networks using
logarithmic data representation", 2016).

- :class:`LowBitLinear` / :class:`LowBitConv1d` / :class:`LowBitConv2d` (grouped and
  depthwise included) train: float latent ``weight``, a signed weight quantizer
  ``weight_quant`` and, with ``activation_bits``, an input quantizer ``input_quant``
  (unsigned when ``act_signed`` is False: inputs after a ReLU); the forward pass uses the
  fake-quantized weight and input (straight-through gradients in training).
- :meth:`freeze` gives :class:`FrozenLowBitLinear` / ... : ``weight`` holds the integer
  codes (int8 ``[out, in]`` / ``[out, in / groups, *k]``, a parameter without gradient so
  size and MAC counts see it; the container stores a ``b``-bit code at ``b`` bits, or
  fewer when pruned / entropy coded), ``weight_step`` and ``input_step`` (0-dim float
  buffers) and ``bias``; the quantizer kind, bits and input sign are constructor args, so
  a ``.nnc`` file rebuilds them. Code 0 is exactly 0 (a pruned weight stays pruned). The
  frozen layer dequantizes its codes once per version of them and computes in float; its
  outputs equal the training form's in eval mode.

All subclass the matching ``nn.Linear`` / ``nn.ConvNd`` so code reading a model's layers
(``in_features``, MAC counting) sees them; the frozen forms are built without their base
class's ``__init__`` (no float weight is ever allocated).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from nncompress.errors import RecipeError
from nncompress.quant.lsq import (
    MAX_BITS,
    MIN_BITS,
    QUANTIZERS,
    Quantizer,
    from_codes,
    make_quantizer,
    qmax_of,
    to_codes,
)

__all__ = ["FROZEN_OF", "LOW_BIT_OF", "FrozenLowBitConv1d", "FrozenLowBitConv2d",
           "FrozenLowBitLinear", "LowBitConv1d", "LowBitConv2d", "LowBitLinear", "describe_bits",
           "from_float"]

Padding = str | int | Sequence[int]
#: Attributes a frozen convolution copies from a (meta-device) reference of its base class.
_CONV_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
               "transposed", "output_padding", "groups", "padding_mode",
               "_reversed_padding_repeated_twice")


def _check_bits(bits: Any, what: str, optional: bool = False) -> None:
    if optional and bits is None:
        return
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise RecipeError(f"{what} must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")


def _check_kind(quantizer: Any) -> None:
    if quantizer not in QUANTIZERS:
        raise RecipeError(f"quantizer must be one of {', '.join(QUANTIZERS)}, got "
                          f"{quantizer!r}")


def describe_bits(layer: Any) -> str:
    """E.g. "3-bit linear weights, 4-bit unsigned inputs" for a low-bit layer."""
    acts = layer.activation_bits
    sign = "signed" if layer.act_signed else "unsigned"
    inputs = "float" if acts is None else f"{acts}-bit {sign}"
    return f"{layer.weight_bits}-bit {layer.quantizer} weights, {inputs} inputs"


class _LowBit:
    """Training body shared by the low-bit layers."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    input_quant: Quantizer | None

    def _setup_lowbit(self, weight_bits: int, activation_bits: int | None, quantizer: str,
                      act_signed: bool, init: str) -> None:
        _check_bits(weight_bits, "weight_bits")
        _check_bits(activation_bits, "activation_bits", optional=True)
        _check_kind(quantizer)
        module: Any = self
        self.weight_bits, self.activation_bits = weight_bits, activation_bits
        self.quantizer, self.act_signed = quantizer, bool(act_signed)
        module.weight_quant = make_quantizer(quantizer, weight_bits, signed=True, init=init)
        module.add_module("input_quant", None if activation_bits is None else make_quantizer(
            quantizer, activation_bits, signed=act_signed, batched=True, init=init))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {describe_bits(self)}"  # type: ignore[misc]

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight (straight-through gradients in training)."""
        module: Any = self
        return module.weight_quant(self.weight)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quant is None else self.input_quant(x)

    def codes(self) -> torch.Tensor:
        """The weight's integer codes (int8)."""
        module: Any = self
        return module.weight_quant.codes(self.weight.detach()).to(torch.int8)

    def _fill_frozen(self, frozen: Any) -> Any:
        module: Any = self
        with torch.no_grad():
            frozen.weight.copy_(self.codes())
            frozen.weight_step.copy_(module.weight_quant.step.detach().clamp_min(1e-12))
            if self.input_quant is not None:
                frozen.input_step.copy_(self.input_quant.step.detach().clamp_min(1e-12))
            if self.bias is not None:
                frozen.bias.copy_(self.bias.detach())
        return frozen.to(self.weight.device)


class LowBitLinear(_LowBit, nn.Linear):
    """Training form of a low-bit ``nn.Linear``: ``[..., in] -> [..., out]``, ``weight``
    ``[out, in]`` latent floats. :meth:`freeze` gives :class:`FrozenLowBitLinear`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 weight_bits: int = 4, activation_bits: int | None = None,
                 quantizer: str = "linear", act_signed: bool = False,
                 init: str = "lsq") -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias)
        self._setup_lowbit(weight_bits, activation_bits, quantizer, act_signed, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.quantized_input(x), self.quantized_weight(),
                                    self.bias)

    def freeze(self) -> FrozenLowBitLinear:
        """The inference form: int8 codes, steps, bias."""
        return self._fill_frozen(FrozenLowBitLinear(
            self.in_features, self.out_features, bias=self.bias is not None,
            weight_bits=self.weight_bits, activation_bits=self.activation_bits,
            quantizer=self.quantizer, act_signed=self.act_signed))


class _LowBitConv(_LowBit):
    """Training body of the low-bit convolutions."""

    base: type[nn.Module]

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] = 1, padding: Padding = 0,
                 dilation: int | Sequence[int] = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", *, weight_bits: int = 4,
                 activation_bits: int | None = None, quantizer: str = "linear",
                 act_signed: bool = False, init: str = "lsq") -> None:
        self.base.__init__(self, in_channels, out_channels, kernel_size,  # type: ignore[call-arg]
                           stride=stride, padding=padding, dilation=dilation, groups=groups,
                           bias=bias, padding_mode=padding_mode)
        self._setup_lowbit(weight_bits, activation_bits, quantizer, act_signed, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m: Any = self
        return m._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)

    def freeze(self) -> Any:
        """The inference form: int8 codes, steps, bias."""
        m: Any = self
        frozen_cls = FROZEN_OF[type(self)]
        return self._fill_frozen(frozen_cls(
            m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
            m.groups, bias=self.bias is not None, padding_mode=m.padding_mode,
            weight_bits=self.weight_bits, activation_bits=self.activation_bits,
            quantizer=self.quantizer, act_signed=self.act_signed))


class LowBitConv1d(_LowBitConv, nn.Conv1d):
    """Training form of a low-bit ``nn.Conv1d``: ``weight`` ``[out, in / groups, k]``."""

    base = nn.Conv1d


class LowBitConv2d(_LowBitConv, nn.Conv2d):
    """Training form of a low-bit ``nn.Conv2d``: ``weight`` ``[out, in / groups, kh, kw]``."""

    base = nn.Conv2d


class _Frozen:
    """Inference body: int8 code ``weight``, ``weight_step``, optional ``input_step``."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    weight_step: torch.Tensor
    input_step: torch.Tensor | None

    def _setup_frozen(self, shape: Sequence[int], bias: bool, weight_bits: int,
                      activation_bits: int | None, quantizer: str, act_signed: bool) -> None:
        _check_bits(weight_bits, "weight_bits")
        _check_bits(activation_bits, "activation_bits", optional=True)
        _check_kind(quantizer)
        module: Any = self
        self.weight_bits, self.activation_bits = weight_bits, activation_bits
        self.quantizer, self.act_signed = quantizer, bool(act_signed)
        self.weight = nn.Parameter(torch.zeros(*shape, dtype=torch.int8), requires_grad=False)
        module.register_parameter("bias", nn.Parameter(torch.zeros(int(shape[0])),
                                                       requires_grad=False) if bias else None)
        module.register_buffer("weight_step", torch.ones(()))
        module.register_buffer("input_step", None if activation_bits is None
                               else torch.ones(()))
        self._cache: tuple[tuple[Any, ...], torch.Tensor] | None = None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {describe_bits(self)}"  # type: ignore[misc]

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The real weight the codes stand for (computed once per version of the codes)."""
        key = (self.weight.data_ptr(), self.weight._version, self.weight_step.data_ptr(),
               self.weight_step._version, dtype)
        if self._cache is None or self._cache[0] != key:
            values = from_codes(self.quantizer, self.weight, self.weight_step,
                                qmax_of(self.weight_bits, True))
            self._cache = (key, values.to(dtype))
        return self._cache[1]

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_step is None or self.activation_bits is None:
            return x
        qmax = qmax_of(self.activation_bits, self.act_signed)
        codes = to_codes(self.quantizer, x, self.input_step, qmax, self.act_signed)
        return from_codes(self.quantizer, codes, self.input_step, qmax).to(x.dtype)


class FrozenLowBitLinear(_Frozen, nn.Linear):
    """Inference form of a low-bit Linear: ``weight`` ``[out, in]`` int8 codes."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 weight_bits: int = 4, activation_bits: int | None = None,
                 quantizer: str = "linear", act_signed: bool = False) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._setup_frozen((out_features, in_features), bias, weight_bits, activation_bits,
                           quantizer, act_signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.quantized_input(x), self.dequantized_weight(x.dtype),
                                    self.bias)


class _FrozenConv(_Frozen):
    """Inference body of the frozen low-bit convolutions."""

    base: type[nn.Module]

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] = 1, padding: Padding = 0,
                 dilation: int | Sequence[int] = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", *, weight_bits: int = 4,
                 activation_bits: int | None = None, quantizer: str = "linear",
                 act_signed: bool = False) -> None:
        nn.Module.__init__(self)  # type: ignore[arg-type]
        reference = self.base(in_channels, out_channels, kernel_size,  # type: ignore[call-arg]
                              stride=stride, padding=padding, dilation=dilation,
                              groups=groups, bias=False, padding_mode=padding_mode,
                              device="meta")
        for attr in _CONV_ATTRS:
            setattr(self, attr, getattr(reference, attr))
        shape = tuple(reference.weight.shape)  # type: ignore[union-attr]
        self._setup_frozen(shape, bias, weight_bits, activation_bits, quantizer, act_signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m: Any = self
        return m._conv_forward(self.quantized_input(x), self.dequantized_weight(x.dtype),
                               self.bias)


class FrozenLowBitConv1d(_FrozenConv, nn.Conv1d):
    """Inference form of a low-bit Conv1d: ``weight`` ``[out, in / groups, k]`` int8 codes."""

    base = nn.Conv1d


class FrozenLowBitConv2d(_FrozenConv, nn.Conv2d):
    """Inference form of a low-bit Conv2d: ``weight`` ``[out, in / groups, kh, kw]`` codes."""

    base = nn.Conv2d


#: float layer type -> its low-bit training form (exact types: subclasses are not taken).
LOW_BIT_OF: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: LowBitLinear, nn.Conv1d: LowBitConv1d, nn.Conv2d: LowBitConv2d}
#: training form -> frozen form.
FROZEN_OF: dict[type[nn.Module], type[nn.Module]] = {
    LowBitLinear: FrozenLowBitLinear, LowBitConv1d: FrozenLowBitConv1d,
    LowBitConv2d: FrozenLowBitConv2d}


def from_float(layer: nn.Module, *, weight_bits: int, activation_bits: int | None = None,
               quantizer: str = "linear", act_signed: bool = False,
               init: str = "lsq") -> nn.Module:
    """The training form of a float Linear / Conv1d / Conv2d, sharing its weight and bias
    (the weight step is initialised from the weight; the input step on first use)."""
    kind = LOW_BIT_OF.get(type(layer))
    if kind is None:
        raise RecipeError(f"low-bit layers replace Linear, Conv1d and Conv2d, not "
                          f"{type(layer).__name__}")
    options = {"weight_bits": weight_bits, "activation_bits": activation_bits,
               "quantizer": quantizer, "act_signed": act_signed, "init": init}
    m: Any = layer
    if isinstance(layer, nn.Linear):
        new: Any = LowBitLinear(m.in_features, m.out_features, m.bias is not None, **options)
    else:
        new = kind(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                   m.dilation, m.groups, m.bias is not None, m.padding_mode, **options)
    new.to(device=m.weight.device)
    new.weight = m.weight
    if m.bias is not None:
        new.bias = m.bias
    new.weight_quant.initialise(m.weight)
    return new
