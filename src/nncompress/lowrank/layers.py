"""Factorised layer types: a weight ``W`` replaced by the product of two thinner factors.

- :class:`LowRankLinear`: ``W[out, in] ~ U[out, r] V[r, in]`` (truncated SVD, Xue, Li &
  Gong, 2013). The module *is* an ``nn.Linear`` whose own ``weight`` is the second factor
  ``U`` ``[out, r]`` (with the bias); its child ``first`` is ``Linear(in, r, bias=False)``
  holding ``V``. So code that looks for Linears (``arch_config`` of the reference models,
  MAC counting, connection pruning) keeps working and counts each factor exactly once.
- :class:`LowRankConv1d` / :class:`LowRankConv2d`: Denton et al. (2014)'s monochromatic-
  free SVD of ``W[out, in * k]``: ``first`` is a Conv(in -> r, kernel k, the original
  stride/padding/dilation, no bias), the module's own ``weight`` ``[out, r, 1(, 1)]`` is a
  pointwise conv (r -> out) with the bias. ``kernel_size``/``stride``/``padding`` describe
  the factorised layer as a whole (they equal ``first``'s).
- :class:`LowRankRNN`: the input-to-hidden matrix ``W_ih[G*H, in] ~ U V`` of a single-layer
  GRU/LSTM/RNN as ``proj = Linear(in, r, bias=False)`` (``V``) applied to the sequence,
  then the native ``nn.GRU``/``nn.LSTM`` with ``input_size=r`` and ``weight_ih = U``.

Every class takes only JSON-able constructor args (plus ``device``), so the ``.nnc``
container rebuilds them from its architecture record; each registers itself in
``formats.layer_types.LAYER_TYPES`` at the end of this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nncompress.formats.layer_types import (
    LAYER_TYPES,
    LayerType,
    bool_arg,
    choice_arg,
    int_arg,
    ints_arg,
    padding_arg,
    positive_arg,
)

__all__ = ["RNN_MODES", "LowRankConv1d", "LowRankConv2d", "LowRankLinear", "LowRankRNN"]

Device = torch.device | str | None

#: mode name -> recurrent layer class wrapped by :class:`LowRankRNN`.
RNN_MODES: dict[str, type[nn.RNNBase]] = {"GRU": nn.GRU, "LSTM": nn.LSTM, "RNN": nn.RNN}


class LowRankLinear(nn.Linear):
    """``x[..., in] -> first (V: in -> r) -> own weight (U: r -> out) + bias -> [..., out]``.

    ``weight``: ``[out_features, rank]``; ``first.weight``: ``[rank, in_features]``.
    ``in_features`` reads ``first``'s width, so it stays right if ``first`` is replaced.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: Device = None) -> None:
        nn.Module.__init__(self)
        self.out_features = out_features
        self.rank = rank
        self.first = nn.Linear(in_features, rank, bias=False, device=device)
        self.weight = nn.Parameter(torch.empty(out_features, rank, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @property  # type: ignore[override]
    def in_features(self) -> int:
        return self.first.in_features

    def reset_parameters(self) -> None:
        """Fresh init of both factors (the usual Linear init of each)."""
        if "first" not in self._modules:  # nn.Linear internals may call this early
            return
        self.first.reset_parameters()
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        if self.bias is not None:
            bound = 1.0 / max(1, self.rank) ** 0.5
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.first(x), self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}")


def _tuple(value: int | Sequence[int], dims: int) -> tuple[int, ...]:
    return (int(value),) * dims if isinstance(value, int) else tuple(int(v) for v in value)


class _LowRankConvMixin:
    """Shared body of the factorised convolutions (``dims`` spatial dimensions)."""

    dims: int
    conv_cls: type[nn.Module]
    conv_fn: Any

    def __init__(self, in_channels: int, out_channels: int, rank: int,
                 kernel_size: int | Sequence[int], stride: int | Sequence[int] = 1,
                 padding: str | int | Sequence[int] = 0, dilation: int | Sequence[int] = 1,
                 bias: bool = True, padding_mode: str = "zeros", device: Device = None) -> None:
        self._setup(in_channels, out_channels, rank, kernel_size, stride, padding, dilation,
                    bias, padding_mode, device)

    def _setup(self, in_channels: int, out_channels: int, rank: int,
               kernel_size: int | Sequence[int], stride: int | Sequence[int],
               padding: str | int | Sequence[int], dilation: int | Sequence[int],
               bias: bool, padding_mode: str, device: Device) -> None:
        nn.Module.__init__(self)  # type: ignore[arg-type]
        d = self.dims
        self.out_channels = out_channels
        self.rank = rank
        self.kernel_size = _tuple(kernel_size, d)
        self.stride = _tuple(stride, d)
        self.padding = padding if isinstance(padding, str) else _tuple(padding, d)
        self.dilation = _tuple(dilation, d)
        self.groups = 1
        self.padding_mode = padding_mode
        self.transposed = False
        self.output_padding = (0,) * d
        self.first = self.conv_cls(in_channels, rank, self.kernel_size, stride=self.stride,
                                   padding=self.padding, dilation=self.dilation, bias=False,
                                   padding_mode=padding_mode, device=device)
        self.weight = nn.Parameter(torch.empty(out_channels, rank, *(1,) * d, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, device=device))
        else:
            self.register_parameter("bias", None)  # type: ignore[attr-defined]
        self.reset_parameters()

    @property
    def in_channels(self) -> int:
        return self.first.in_channels  # type: ignore[attr-defined]

    def reset_parameters(self) -> None:
        if "first" not in self._modules:  # type: ignore[attr-defined]
            return
        self.first.reset_parameters()  # type: ignore[attr-defined]
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # type: ignore[attr-defined]
        if self.bias is not None:  # type: ignore[attr-defined]
            bound = 1.0 / max(1, self.rank) ** 0.5
            nn.init.uniform_(self.bias, -bound, bound)  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_fn(self.first(x), self.weight, self.bias)  # type: ignore[attr-defined]

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, rank={self.rank}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, bias={self.bias is not None}")  # type: ignore


class LowRankConv1d(_LowRankConvMixin, nn.Conv1d):
    """``[B, in, L] -> Conv1d(in -> r, k) -> pointwise (r -> out) + bias -> [B, out, L']``.

    ``first.weight``: ``[r, in, k]``; ``weight``: ``[out, r, 1]``.
    """

    dims = 1
    conv_cls = nn.Conv1d
    conv_fn = staticmethod(F.conv1d)


class LowRankConv2d(_LowRankConvMixin, nn.Conv2d):
    """``[B, in, H, W] -> Conv2d(in -> r, k) -> pointwise (r -> out) + bias``.

    ``first.weight``: ``[r, in, kh, kw]``; ``weight``: ``[out, r, 1, 1]``.
    """

    dims = 2
    conv_cls = nn.Conv2d
    conv_fn = staticmethod(F.conv2d)


class LowRankRNN(nn.Module):
    """``x[B, T, in] (batch_first) -> proj (in -> r) -> native GRU/LSTM/RNN (r -> H)``.

    Returns what the wrapped ``rnn`` returns (``output, h_n`` or ``output, (h_n, c_n)``).
    ``proj.weight``: ``[r, in]``; ``rnn.weight_ih_l0``: ``[G*H, r]`` (G = 3 GRU, 4 LSTM, 1).
    ``proj_size`` > 0 gives an LSTM with a projected recurrence (Sak et al., 2014).
    """

    def __init__(self, mode: str, input_size: int, rank: int, hidden_size: int,
                 bias: bool = True, batch_first: bool = True, proj_size: int = 0,
                 device: Device = None) -> None:
        super().__init__()
        if mode not in RNN_MODES:
            raise ValueError(f"mode must be one of {', '.join(RNN_MODES)}, got {mode!r}")
        if proj_size and mode != "LSTM":
            raise ValueError(f"proj_size needs mode 'LSTM', got {mode!r}")
        self.mode = mode
        self.rank = rank
        self.proj = nn.Linear(input_size, rank, bias=False, device=device)
        extra: dict[str, Any] = {"proj_size": proj_size} if mode == "LSTM" else {}
        self.rnn = RNN_MODES[mode](rank, hidden_size, bias=bias, batch_first=batch_first,
                                   device=device, **extra)

    @property
    def input_size(self) -> int:
        return self.proj.in_features

    @property
    def hidden_size(self) -> int:
        return self.rnn.hidden_size

    @property
    def proj_size(self) -> int:
        return getattr(self.rnn, "proj_size", 0)

    @property
    def bias(self) -> bool:
        return bool(self.rnn.bias)

    @property
    def batch_first(self) -> bool:
        return bool(self.rnn.batch_first)

    def forward(self, x: torch.Tensor, hx: Any = None) -> Any:
        return self.rnn(self.proj(x), hx)


# factorised layers: rebuilt parent first, then their children (``first``, ``proj``)
_LOW_RANK_CONV = {"rank": positive_arg, "in_channels": int_arg, "out_channels": int_arg,
                  "kernel_size": ints_arg, "stride": ints_arg, "padding": padding_arg,
                  "dilation": ints_arg, "bias": bool_arg,
                  "padding_mode": choice_arg("zeros", "reflect", "replicate", "circular")}
LAYER_TYPES.register("LowRankLinear", LayerType(LowRankLinear, {
    "in_features": int_arg, "out_features": int_arg, "rank": positive_arg, "bias": bool_arg}))
LAYER_TYPES.register("LowRankConv1d", LayerType(LowRankConv1d, dict(_LOW_RANK_CONV)))
LAYER_TYPES.register("LowRankConv2d", LayerType(LowRankConv2d, dict(_LOW_RANK_CONV)))
LAYER_TYPES.register("LowRankRNN", LayerType(LowRankRNN, {
    "mode": choice_arg(*RNN_MODES), "input_size": int_arg, "rank": positive_arg,
    "hidden_size": int_arg, "bias": bool_arg, "batch_first": bool_arg, "proj_size": int_arg}))
