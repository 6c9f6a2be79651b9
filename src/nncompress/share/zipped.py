"""The zipped model: :class:`ZippedPair` of :class:`ZipLayer` s (see
:mod:`nncompress.share.zipping` for how two models become one).

A zipped model saves and loads as one ``.nnc`` file without a skeleton: it is the
architecture ``"zipped_pair"``, whose config records every part as a ``{"type", "args"}``
spec validated on load by :func:`nncompress.formats.arch.build_module`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from nncompress.errors import ModelError, UnsupportedLayerError
from nncompress.models.base import ARCHITECTURES, ArchModule
from nncompress.share._views import OutputView

__all__ = ["Spec", "ZipLayer", "ZippedPair", "spec_of"]


class ZipLayer(nn.Module):
    """One zipped layer: ``shared`` reads ``[s, a, b]``, ``only_a`` reads ``[s, a]``,
    ``only_b`` reads ``[s, b]`` (concatenated along dim 1: features or channels; an absent
    part is ``None``); the same per-unit ``activation`` (ReLU, pooling, Flatten, ...)
    follows all three."""

    def __init__(self, shared: nn.Module | None, only_a: nn.Module | None,
                 only_b: nn.Module | None, activation: nn.Module) -> None:
        super().__init__()
        self.shared, self.only_a, self.only_b = shared, only_a, only_b
        self.activation = activation

    def forward(self, s: torch.Tensor, a: torch.Tensor,
                b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs = {"shared": (s, a, b), "only_a": (s, a), "only_b": (s, b)}
        outs = {name: self.activation(layer(torch.cat(inputs[name], dim=1)))
                for name, layer in (("shared", self.shared), ("only_a", self.only_a),
                                    ("only_b", self.only_b)) if layer is not None}
        empty = next(iter(outs.values()))[:, :0]  # an absent part: no units, same shape
        return (outs.get("shared", empty), outs.get("only_a", empty),
                outs.get("only_b", empty))


Spec = dict[str, Any]


def spec_of(module: nn.Module) -> Spec:
    """``{"type", "args"}`` of a module the file format can rebuild, else
    UnsupportedLayerError."""
    from nncompress.formats.arch import module_spec

    spec = module_spec(module)
    if spec["args"] is None:
        raise UnsupportedLayerError(f"multi-task zipping: {type(module).__name__} has no "
                                    f"file record (see formats.LAYER_TYPES)")
    return spec


def _built(spec: Spec | nn.Module | None, what: str) -> nn.Module | None:
    from nncompress.formats.arch import build_module

    if spec is None or isinstance(spec, nn.Module):
        return spec
    return build_module(spec, what)


def _sequence(items: nn.Module | Sequence[Spec], what: str) -> nn.Sequential:
    if isinstance(items, nn.Sequential):
        return items
    if isinstance(items, nn.Module):
        return nn.Sequential(items)
    return nn.Sequential(*(_built(spec, f"{what}[{i}]") for i, spec in enumerate(items)))


class ZippedPair(ArchModule):
    """Two task models zipped: ``forward(x)`` returns ``(logits_a, logits_b)``.

    ``pre`` (e.g. Flatten) runs once on the shared input ``x``; ``layers`` are the zipped
    :class:`ZipLayer` s; ``tail_a`` / ``tail_b`` are each task's remaining layers, reading
    ``[s, a]`` / ``[s, b]``. :meth:`task` gives one task's single-output view. Each part
    may also be given as the JSON spec :meth:`arch_config` writes, which is how ``nc.load``
    rebuilds a saved zipped model.
    """

    arch_name = "zipped_pair"

    def __init__(self, pre: nn.Module | Sequence[Spec], layers: Sequence[ZipLayer | Spec],
                 tail_a: nn.Module | Sequence[Spec],
                 tail_b: nn.Module | Sequence[Spec]) -> None:
        super().__init__()
        self.pre = _sequence(pre, "pre")
        self.layers = nn.ModuleList(
            layer if isinstance(layer, ZipLayer) else ZipLayer(
                *(_built(layer[part], f"layers[{i}].{part}")
                  for part in ("shared", "only_a", "only_b")),
                _sequence(layer["activation"], f"layers[{i}].activation"))
            for i, layer in enumerate(layers))
        self.tail_a, self.tail_b = _sequence(tail_a, "tail_a"), _sequence(tail_b, "tail_b")

    def arch_config(self) -> dict[str, Any]:
        return {
            "pre": [spec_of(m) for m in self.pre],
            "layers": [{part: None if getattr(layer, part) is None
                        else spec_of(getattr(layer, part))
                        for part in ("shared", "only_a", "only_b")}
                       | {"activation": [spec_of(m) for m in layer.activation]}
                       for layer in self.layers],
            "tail_a": [spec_of(m) for m in self.tail_a],
            "tail_b": [spec_of(m) for m in self.tail_b],
        }

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(s, a, b)`` after the zipped layers (before any zipping: ``(x, [], [])``)."""
        s = self.pre(x)
        a = b = s[:, :0]
        for layer in self.layers:
            s, a, b = layer(s, a, b)
        return s, a, b

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, a, b = self.features(x)
        return self.tail_a(torch.cat([s, a], 1)), self.tail_b(torch.cat([s, b], 1))

    def task(self, index: int) -> nn.Module:
        """Task ``index`` (0 = A, 1 = B) as a module returning that task's logits only."""
        if index not in (0, 1):
            raise ModelError(f"a zipped pair has tasks 0 and 1, got {index!r}")
        return OutputView(self, index)

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Task ``index``'s logits (only that task's tail runs)."""
        s, a, b = self.features(x)
        if index == 0:
            return self.tail_a(torch.cat([s, a], 1))
        return self.tail_b(torch.cat([s, b], 1))


ARCHITECTURES.register(ZippedPair.arch_name, ZippedPair)
