"""Conversion rules of the functional layers: ``F.linear`` / ``F.conv1d`` / ``F.conv2d``
called with a model's own parameters.

Layers whose ``forward`` calls the functional op on their parameters -- the factorised
layers of :mod:`nncompress.lowrank.layers` (``F.linear(self.first(x), self.weight,
self.bias)``, Xue, Li & Gong 2013; Denton et al. 2014), or a user's block -- trace to a
``call_function`` node whose weight and bias are ``get_attr`` nodes. Such a node is an
``nn.Linear`` / ``nn.ConvNd`` in all but name, so it gets the same rule (Jacob et al.,
2018): int8 weights per output channel, int32 bias, fixed-point requantization, a ReLU
right after it fused into the clamp. A weight computed at run time (not a parameter or
buffer) is refused by name.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from nncompress.quant.convert_rules import Builder

__all__ = ["FUNCTIONAL_RULES"]

_CONV_ARGS = ("stride", "padding", "dilation", "groups")
_CONV_DEFAULTS: dict[str, Any] = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _constants(b: Builder, node: fx.Node) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias (parameters or buffers) a functional layer node is called with;
    a one-line refusal when either is computed at run time."""
    weight_arg, bias_arg = _arg(node, 1, "weight"), _arg(node, 2, "bias")
    weight = b.attr_tensor(weight_arg)
    bias = None if bias_arg is None else b.attr_tensor(bias_arg)
    if weight is None or (bias_arg is not None and bias is None):
        b.fail(node, "is called with a weight or bias computed at run time; only parameters "
                     "and buffers convert")
    assert weight is not None
    if not weight.is_floating_point() or not bool(torch.isfinite(weight).all()):
        b.fail(node, "has a non-float or non-finite weight")
    return weight, bias


def _linear(b: Builder, node: fx.Node) -> None:
    """``F.linear(x, weight, bias)``: as ``nn.Linear``."""
    weight, bias = _constants(b, node)
    b.weighted_tensors(node, "linear", b.value(node, node.args[0]), weight, bias, {})


def _conv(b: Builder, node: fx.Node) -> None:
    """``F.conv1d`` / ``F.conv2d(x, weight, bias, stride, padding, dilation, groups)``: as
    ``nn.Conv1d`` / ``nn.Conv2d`` with zero padding."""
    weight, bias = _constants(b, node)
    nd = weight.dim() - 2
    given = {k: _arg(node, 3 + i, k, _CONV_DEFAULTS[k]) for i, k in enumerate(_CONV_ARGS)}

    def spread(v: Any) -> Any:
        return v if isinstance(v, str) else tuple(v) if isinstance(v, (tuple, list)) \
            else (int(v),) * nd
    layer = SimpleNamespace(weight=weight, padding_mode="zeros",
                            kernel_size=tuple(weight.shape[2:]), groups=int(given["groups"]),
                            **{k: spread(given[k]) for k in ("stride", "padding", "dilation")})
    attrs = b.conv_attrs(node, layer)  # type: ignore[arg-type]
    b.weighted_tensors(node, "conv", b.value(node, node.args[0]), weight, bias, attrs)


#: functional layer -> rule (merged into ``convert_ops.RULES``).
FUNCTIONAL_RULES: dict[Any, Callable[[Builder, fx.Node], None]] = {
    F.linear: _linear, torch.nn.functional.linear: _linear,
    F.conv1d: _conv, torch.conv1d: _conv, F.conv2d: _conv, torch.conv2d: _conv,
}
