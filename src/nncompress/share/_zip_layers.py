"""What multi-task zipping needs to know about a layer kind, in one place.

A zippable layer is ``nn.Linear`` or an ``nn.Conv1d`` / ``nn.Conv2d`` with ``groups=1``
and zero padding. Its *units* are output features / channels; its weight, flattened per
unit, is a row ``[in_units * kernel_numel]`` read from the input's patches (the input
itself for Linear, ``unfold`` patches for a convolution, channel-major like the weight).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ZIPPABLE", "flat_weight", "geometry", "make_like", "patches", "unsupported",
           "with_input_order"]

ZIPPABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


def unsupported(layer: nn.Module) -> str | None:
    """Why ``layer`` cannot be zipped, or ``None``."""
    if not isinstance(layer, ZIPPABLE):
        return f"{type(layer).__name__} is not Linear/Conv1d/Conv2d"
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        if layer.groups != 1:
            return f"grouped convolution (groups={layer.groups})"
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            return f"padding {layer.padding!r} / mode {layer.padding_mode!r}"
    return None


def geometry(layer: nn.Module) -> tuple:
    """Everything but the unit counts: two layers zip only if these are equal."""
    if isinstance(layer, nn.Linear):
        return ("Linear",)
    return (type(layer).__name__, layer.kernel_size, layer.stride, layer.padding,
            layer.dilation)


def _kernel(layer: nn.Module) -> tuple[int, ...]:
    return () if isinstance(layer, nn.Linear) else tuple(layer.kernel_size)


def flat_weight(layer: nn.Module) -> torch.Tensor:
    """``[units, in_units * kernel_numel + 1]`` float64: weights then the bias (0 if none)."""
    w = layer.weight.detach().double().reshape(layer.weight.shape[0], -1)
    bias = (layer.bias.detach().double() if layer.bias is not None
            else torch.zeros(w.shape[0], dtype=torch.float64))
    return torch.cat([w, bias[:, None]], 1)


def make_like(layer: nn.Module, rows: torch.Tensor, in_units: int) -> nn.Module:
    """A new layer of ``layer``'s kind and geometry from ``rows [units, in_units * k + 1]``."""
    units = rows.shape[0]
    if isinstance(layer, nn.Linear):
        new: nn.Module = nn.Linear(in_units, units)
    else:
        new = type(layer)(in_units, units, layer.kernel_size, layer.stride, layer.padding,
                          layer.dilation)
    with torch.no_grad():
        new.weight.copy_(rows[:, :-1].reshape(units, in_units, *_kernel(layer)))
        new.bias.copy_(rows[:, -1])
    return new


def patches(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What each unit's weight row multiplies: ``[N, in_units * kernel_numel]``."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(layer, nn.Conv1d):
        cols = F.unfold(x.unsqueeze(2), (1, layer.kernel_size[0]),
                        dilation=(1, layer.dilation[0]), padding=(0, layer.padding[0]),
                        stride=(1, layer.stride[0]))
    else:
        cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                        stride=layer.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # [B * positions, C * k]


def with_input_order(layer: nn.Module, order: torch.Tensor, units_before: int) -> nn.Module:
    """A copy of ``layer`` whose inputs are the previous layer's ``units_before`` units in
    ``order``. A Linear after a flattened feature map reads ``in_features / units_before``
    consecutive columns per unit."""
    w = layer.weight.detach()
    if isinstance(layer, nn.Linear):
        width = w.shape[1] // units_before
        cols = (order[:, None] * width + torch.arange(width)[None, :]).reshape(-1)
        weight = w[:, cols]
    else:
        weight = w[:, order]
    rows = torch.cat([weight.reshape(w.shape[0], -1).double(),
                      flat_weight(layer)[:, -1:]], 1)
    return make_like(layer, rows, weight.shape[1])


def in_units(layer: nn.Module) -> int:
    """Input features / channels."""
    return int(layer.weight.shape[1])


def kernel_numel(layer: nn.Module) -> int:
    return math.prod(_kernel(layer))
