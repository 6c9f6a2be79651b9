"""Binary Linear / Conv1d / Conv2d layers: latent float weights for training, 1-bit frozen
forms for inference.

Courbariaux, Hubara, Soudry, El-Yaniv & Bengio (2016), "Binarized neural networks"
(BinaryConnect / BNN) and Rastegari, Ordonez, Redmon & Farhadi (2016), "XNOR-Net":

- weights are binarized on the fly from latent float weights ``W`` (kept in [-1, 1]):
  deterministic ``sign(W)`` or, with ``stochastic``, ``+1`` with probability
  ``hard_sigmoid(W) = clip((W + 1) / 2, 0, 1)`` (seeded); gradients pass by the
  straight-through estimator with clipping (``1`` where ``|W| <= 1``, else ``0``);
- with ``scaling``, each output channel is multiplied by ``alpha = mean |W|`` over its
  weights (XNOR-Net's per-channel factor; XNOR-Net's per-position activation factor is
  left out, as Bulat & Tzimiropoulos (2019, XNOR-Net++) found it adds cost for little);
- with ``activations``, the layer's input is binarized too: ``a = sign(x - t)`` with a
  learned threshold ``t`` per input feature (Linear) or channel (Conv), the batch norm
  before BNN's sign folded into one number (as FINN does, Umuroglu et al., 2017), so a
  ReLU before the layer keeps its information; STE with clipping on ``x - t``.

:class:`BinaryLinear` / :class:`BinaryConv1d` / :class:`BinaryConv2d` train; their
``freeze()`` gives :class:`FrozenBinaryLinear` / ... holding ``weight`` as int8 +-1 (a
parameter without gradient, so size and MAC counts see it; the container stores it at 1
bit per weight), ``alpha`` ``[out]`` and, with binary activations, ``threshold`` buffers.
A frozen layer with binary activations runs the XNOR-popcount C kernel in eval mode on
CPU (:mod:`nncompress.kernels.xnor`) and otherwise the plain-torch reference (same
numbers; STE gradients in training mode). All subclass the matching ``nn.Linear`` /
``nn.ConvNd`` so code reading a model's layers (``arch_config``, MAC counting) sees them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nncompress.kernels import xnor

__all__ = ["BinaryConv1d", "BinaryConv2d", "BinaryLinear", "FrozenBinaryConv1d",
           "FrozenBinaryConv2d", "FrozenBinaryLinear", "ste_sign"]

Padding = str | int | Sequence[int]
_SEED_STRIDE = 1_000_003


class _SignSTE(torch.autograd.Function):
    """``-1`` where ``x < 0`` else ``+1`` (or ``+1`` where ``noise < hard_sigmoid(x)``);
    backward: the straight-through estimator with clipping, ``grad * (|x| <= 1)``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x)
        if noise is None:
            return torch.where(x < 0, -1.0, 1.0).to(x.dtype)
        return torch.where(noise < ((x + 1) / 2).clamp(0, 1), 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype), None


def ste_sign(x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Binarize ``x`` to +-1 with clipped straight-through gradients; ``noise`` (uniform
    [0, 1), ``x``'s shape) selects stochastic binarization (Courbariaux et al., 2016)."""
    return _SignSTE.apply(x, noise)


@functools.cache
def _note_fallback(reason: str) -> None:
    """Log once per process that binary layers run the torch reference."""
    logging.getLogger(__name__).warning("XNOR kernel unavailable (%s): binary layers run "
                                        "the plain-torch reference", reason)


def _tuple(value: int | Sequence[int], dims: int) -> tuple[int, ...]:
    return (int(value),) * dims if isinstance(value, int) else tuple(int(v) for v in value)


def _channel_shape(dims: int) -> tuple[int, ...]:
    """Shape that broadcasts a ``[C]`` vector over ``[B, C, *spatial]`` (dims 0: Linear)."""
    return (-1,) if dims == 0 else (1, -1) + (1,) * dims


class _LatentBinary:
    """Shared training body: binarized weights and inputs from latent float tensors."""

    dims: int  # 0 for Linear, 1 / 2 for convolutions
    weight: nn.Parameter
    threshold: nn.Parameter | None
    training: bool

    def _setup_binary(self, activations: bool, scaling: bool, stochastic: bool,
                      seed: int, threshold_size: int) -> None:
        self.activations = bool(activations)
        self.scaling = bool(scaling)
        self.stochastic = bool(stochastic)
        self.seed = int(seed)
        self.steps = 0  # training forwards so far: the stochastic draws' seed offset
        self.threshold = (nn.Parameter(torch.zeros(threshold_size))  # type: ignore[assignment]
                          if activations else None)

    def _noise(self, like: torch.Tensor, salt: int) -> torch.Tensor | None:
        if not (self.stochastic and self.training):
            return None
        g = torch.Generator().manual_seed((self.seed * _SEED_STRIDE + self.steps) * 2 + salt)
        return torch.rand(like.shape, generator=g).to(like.device, like.dtype)

    def alpha(self) -> torch.Tensor:
        """``[out]``: mean |W| per output channel (XNOR-Net) with ``scaling``, else ones."""
        w = self.weight
        if not self.scaling:
            return torch.ones(w.shape[0], dtype=w.dtype, device=w.device)
        return w.abs().reshape(w.shape[0], -1).mean(dim=1)

    def binary_weight(self) -> torch.Tensor:
        """The +-1 weight times ``alpha``; in training the latent weight is clipped to
        [-1, 1] first (BinaryConnect keeps it there after every update)."""
        if self.training:
            with torch.no_grad():
                self.weight.clamp_(-1.0, 1.0)
        signs = ste_sign(self.weight, self._noise(self.weight, 0))
        return signs * self.alpha().reshape((-1,) + (1,) * (self.weight.dim() - 1))

    def binary_input(self, x: torch.Tensor) -> torch.Tensor:
        """``sign(x - threshold)`` with STE when activations are binary, else ``x``."""
        if self.threshold is None:
            return x
        shifted = x - self.threshold.reshape(_channel_shape(self.dims))
        return ste_sign(shifted, self._noise(shifted, 1))

    def _count_step(self) -> None:
        if self.training:
            self.steps += 1


class BinaryLinear(_LatentBinary, nn.Linear):
    """Training form of a binary ``nn.Linear``: ``[..., in] -> [..., out]``.

    ``weight`` ``[out, in]`` latent floats, ``bias`` ``[out]``, ``threshold`` ``[in]``
    (with ``activations``). :meth:`freeze` gives the 1-bit :class:`FrozenBinaryLinear`.
    """

    dims = 0

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 activations: bool = True, scaling: bool = True, stochastic: bool = False,
                 seed: int = 0) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias)
        self._setup_binary(activations, scaling, stochastic, seed, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(self.binary_input(x), self.binary_weight(), self.bias)
        self._count_step()
        return out

    def freeze(self) -> FrozenBinaryLinear:
        """The inference form: int8 signs, ``alpha``, ``bias``, ``threshold``."""
        frozen = FrozenBinaryLinear(self.in_features, self.out_features,
                                    bias=self.bias is not None, activations=self.activations)
        _copy_frozen(self, frozen)
        return frozen


class _LatentConv(_LatentBinary):
    """Training body of the binary convolutions (``dims`` 1 or 2)."""

    conv_fn: Any

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] = 1, padding: Padding = 0,
                 dilation: int | Sequence[int] = 1, groups: int = 1, bias: bool = True, *,
                 activations: bool = True, scaling: bool = True, stochastic: bool = False,
                 seed: int = 0) -> None:
        conv_cls = nn.Conv1d if self.dims == 1 else nn.Conv2d
        conv_cls.__init__(self, in_channels, out_channels, kernel_size,  # type: ignore[arg-type]
                          stride=stride, padding=padding, dilation=dilation, groups=groups,
                          bias=bias)
        self._setup_binary(activations, scaling, stochastic, seed, in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_fn(self.binary_input(x), self.binary_weight(),
                           self.bias, self.stride, self.padding,  # type: ignore[attr-defined]
                           self.dilation, self.groups)  # type: ignore[attr-defined]
        self._count_step()
        return out

    def freeze(self) -> _FrozenConv:
        """The inference form: int8 signs, ``alpha``, ``bias``, ``threshold``."""
        frozen_cls = FrozenBinaryConv1d if self.dims == 1 else FrozenBinaryConv2d
        m: Any = self
        frozen = frozen_cls(m.in_channels, m.out_channels, m.kernel_size, m.stride,
                            m.padding, m.dilation, m.groups, bias=m.bias is not None,
                            activations=self.activations)
        _copy_frozen(self, frozen)
        return frozen


class BinaryConv1d(_LatentConv, nn.Conv1d):
    """Training form of a binary ``nn.Conv1d`` (zero padding): ``[B, in, L] -> [B, out, L']``;
    ``weight`` ``[out, in / groups, k]``, ``threshold`` ``[in]``."""

    dims = 1
    conv_fn = staticmethod(F.conv1d)


class BinaryConv2d(_LatentConv, nn.Conv2d):
    """Training form of a binary ``nn.Conv2d`` (zero padding): ``[B, in, H, W] -> [B, out,
    H', W']``; ``weight`` ``[out, in / groups, kh, kw]``, ``threshold`` ``[in]``."""

    dims = 2
    conv_fn = staticmethod(F.conv2d)


def _copy_frozen(latent: Any, frozen: Any) -> None:
    with torch.no_grad():
        frozen.weight.copy_(torch.where(latent.weight < 0, -1, 1).to(torch.int8))
        frozen.alpha.copy_(latent.alpha().float())
        if latent.bias is not None:
            frozen.bias.copy_(latent.bias)
        if latent.threshold is not None:
            frozen.threshold.copy_(latent.threshold)


class _FrozenBinary:
    """Shared inference body: int8 +-1 ``weight``, ``alpha``, optional ``threshold``."""

    dims: int
    weight: nn.Parameter
    bias: nn.Parameter | None
    alpha: torch.Tensor
    threshold: torch.Tensor | None
    training: bool

    def _setup_frozen(self, weight_shape: Sequence[int], bias: bool, activations: bool,
                      threshold_size: int) -> None:
        out = int(weight_shape[0])
        self.activations = bool(activations)
        self.weight = nn.Parameter(torch.ones(*weight_shape, dtype=torch.int8),
                                   requires_grad=False)
        module: Any = self
        module.register_parameter("bias", nn.Parameter(torch.zeros(out), requires_grad=False)
                                  if bias else None)
        module.register_buffer("alpha", torch.ones(out))
        module.register_buffer("threshold", torch.zeros(threshold_size) if activations
                               else None)
        self._derived: dict[str, tuple[Any, ...]] = {}

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave the derived tensors and kernel plans behind (a plan
        holds raw addresses; the copy derives its own on first use)."""
        state = dict(self.__dict__)
        state["_derived"] = {}
        return state

    def _derive(self, kind: str, make: Any, dtype: torch.dtype | None = None) -> Any:
        """Something computed from the layer's tensors, rebuilt when any of them changes
        (replaced, moved, or edited in place: a new object or a new version). The entry
        holds the tensors it was made from, so an ``id`` seen again is the same tensor."""
        params, buffers = self._parameters, self._buffers  # type: ignore[attr-defined]
        w, b, a, t = tensors = (params["weight"], params["bias"], buffers["alpha"],
                                buffers["threshold"])
        key = (id(w), w._version, id(a), a._version, dtype,
               None if b is None else (id(b), b._version),
               None if t is None else (id(t), t._version))
        held = self._derived.get(kind)
        if held is None or held[0] != key:
            held = (key, make(), tensors)
            self._derived[kind] = held
        return held[1]

    def fold_affine(self, scale: torch.Tensor, offset: torch.Tensor) -> None:
        """Fold ``y' = scale * y + offset`` (per output channel: a BatchNorm in inference,
        Jacob et al. 2018, section 3.2) into ``alpha`` and ``bias``; a channel whose
        ``scale * alpha`` is negative gets its signs flipped (exact), so ``alpha >= 0``."""
        with torch.no_grad():
            alpha = self.alpha * scale.to(self.alpha.dtype)
            flip = (alpha < 0).reshape((-1,) + (1,) * (self.weight.dim() - 1))
            self.weight.copy_(torch.where(flip, -self.weight, self.weight))
            self.alpha.copy_(alpha.abs())
            bias = self.bias if self.bias is not None else torch.zeros_like(self.alpha)
            module: Any = self
            module.bias = nn.Parameter((bias * scale + offset).to(self.alpha.dtype),
                                       requires_grad=False)

    def packed_weight(self) -> torch.Tensor:
        """``[out, words]`` int64 sign bits of ``weight`` (packed once per weight version)."""
        return self._derive("packed", lambda: xnor.pack_signs(self.weight))

    def _make_plan(self) -> Any:
        raise NotImplementedError

    def scaled_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """``sign(W) * alpha`` in ``dtype`` (the weight of a layer with float inputs)."""
        shape = (-1,) + (1,) * (self.weight.dim() - 1)
        return self._derive("scaled", lambda: (self.weight.to(dtype)
                                               * self.alpha.to(dtype).reshape(shape)), dtype)

    def _use_kernel(self, x: torch.Tensor) -> bool:
        """Binary inputs, eval mode, float32 on CPU, no gradient wanted for ``x`` (the
        kernel's availability is checked when its plan is made)."""
        return (self.activations and not self.training and x.is_cpu
                and x.dtype is torch.float32
                and not (x.requires_grad and torch.is_grad_enabled()))

    def kernel_plan(self) -> Any:
        """The XNOR kernel's prepared operands for this layer (see ``kernels.xnor``), or
        ``None`` (logged once) where the kernel is unavailable."""
        return self._derive("plan", self._plan_or_none)

    def _plan_or_none(self) -> Any:
        if not xnor.available():
            _note_fallback(str(xnor.unavailable_reason()))
            return None
        return self._make_plan()

    def _scale(self, out: torch.Tensor) -> torch.Tensor:
        shape = _channel_shape(self.dims)
        out = out * self.alpha.reshape(shape)
        return out + self.bias.reshape(shape) if self.bias is not None else out

    def reference_input(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's input as the plain-torch path sees it (+-1 with binary activations)."""
        if self.threshold is None:
            return x
        return ste_sign(x - self.threshold.reshape(_channel_shape(self.dims)).to(x.dtype))


class FrozenBinaryLinear(_FrozenBinary, nn.Linear):
    """Inference form of a binary Linear: ``[..., in] -> [..., out]``, 1 bit per weight.

    ``weight`` ``[out, in]`` int8 +-1; ``alpha``, ``bias`` ``[out]``; ``threshold`` ``[in]``
    with ``activations``. ``out = (a . sign(W)) * alpha + bias`` (``a`` the binarized input,
    or the input itself without binary activations).
    """

    dims = 0

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activations: bool = True) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._setup_frozen((out_features, in_features), bias, activations, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_kernel(x):
            plan = self.kernel_plan()
            if plan is not None:
                return plan(x)
        return self.reference(x)

    def _make_plan(self) -> xnor.LinearPlan:
        return xnor.LinearPlan(self.packed_weight(), self.in_features, self.alpha, self.bias,
                               self.threshold)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Plain torch: the kernel's numbers with binary activations (STE gradients in
        training); ``x (sign(W) alpha)^T + bias`` without them."""
        if self.threshold is None:
            return F.linear(x, self.scaled_weight(x.dtype), self.bias)
        a = self.reference_input(x)
        return self._scale(F.linear(a, self.weight.to(a.dtype)))


class _FrozenConv(_FrozenBinary):
    """Inference body of the frozen binary convolutions."""

    conv_fn: Any

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] = 1, padding: Padding = 0,
                 dilation: int | Sequence[int] = 1, groups: int = 1, bias: bool = True,
                 activations: bool = True) -> None:
        nn.Module.__init__(self)  # type: ignore[arg-type]
        d = self.dims
        m: Any = self
        m.in_channels, m.out_channels, m.groups = int(in_channels), int(out_channels), groups
        m.kernel_size, m.stride = _tuple(kernel_size, d), _tuple(stride, d)
        m.padding = padding if isinstance(padding, str) else _tuple(padding, d)
        m.dilation = _tuple(dilation, d)
        m.padding_mode, m.transposed, m.output_padding = "zeros", False, (0,) * d
        shape = (out_channels, in_channels // max(groups, 1), *m.kernel_size)
        self._setup_frozen(shape, bias, activations, in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m: Any = self
        if m.groups == 1 and not isinstance(m.padding, str) and self._use_kernel(x):
            plan = self.kernel_plan()
            if plan is not None:
                return plan(x)
        return self.reference(x)

    def _make_plan(self) -> xnor.ConvPlan:
        m: Any = self
        return xnor.ConvPlan(self.packed_weight(), m.in_channels, m.kernel_size, self.alpha,
                             self.bias, self.threshold, m.stride, m.padding, m.dilation)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Plain torch: the kernel's numbers with binary activations (STE gradients in
        training); the convolution with ``sign(W) alpha`` without them."""
        m: Any = self
        geometry = (m.stride, m.padding, m.dilation, m.groups)
        if self.threshold is None:
            return self.conv_fn(x, self.scaled_weight(x.dtype), self.bias, *geometry)
        a = self.reference_input(x)
        return self._scale(self.conv_fn(a, self.weight.to(a.dtype), None, *geometry))


class FrozenBinaryConv1d(_FrozenConv, nn.Conv1d):
    """Inference form of a binary Conv1d (zero padding), 1 bit per weight: ``weight``
    ``[out, in / groups, k]`` int8 +-1, ``alpha``/``bias`` ``[out]``, ``threshold`` ``[in]``."""

    dims = 1
    conv_fn = staticmethod(F.conv1d)


class FrozenBinaryConv2d(_FrozenConv, nn.Conv2d):
    """Inference form of a binary Conv2d (zero padding), 1 bit per weight: ``weight``
    ``[out, in / groups, kh, kw]`` int8 +-1, ``alpha``/``bias`` ``[out]``, ``threshold``."""

    dims = 2
    conv_fn = staticmethod(F.conv2d)
