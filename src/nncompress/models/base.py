"""What every reference model shares: ``ArchModule``, ``ModelSpec`` and the registries.

An :class:`ArchModule` can describe itself as JSON-able constructor kwargs
(:meth:`ArchModule.arch_config`) so that ``type(m)(**m.arch_config())`` rebuilds the same
architecture. The config is read from the *live* submodules (widths from layer shapes), so
after structural pruning swaps a layer for a narrower one the config describes the pruned
model, and a packed artifact can be rebuilt from it without pickle.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from nncompress.errors import ModelError
from nncompress.registry import Registry

__all__ = ["ARCHITECTURES", "MODELS", "ArchModule", "ModelSpec", "check_rank", "per_layer"]


class ArchModule(nn.Module, ABC):
    """A model that can rebuild itself from a JSON-able config.

    Subclasses set ``arch_name`` (their key in :data:`ARCHITECTURES`) and implement
    :meth:`arch_config`. Their ``forward`` never hard-codes a layer width.
    """

    arch_name: ClassVar[str]

    @abstractmethod
    def arch_config(self) -> dict[str, Any]:
        """JSON-able constructor kwargs describing the current (possibly pruned) layers."""


@dataclass(frozen=True)
class ModelSpec:
    """A named reference model: its class, the data it trains on by default, and how."""

    name: str
    cls: type[ArchModule]
    default_dataset: str
    epochs: int
    lr: float
    description: str


#: arch_name -> ArchModule subclass; formats rebuild saved models through it.
ARCHITECTURES: Registry[type[ArchModule]] = Registry("architecture", error=ModelError)
#: model name -> ModelSpec (the reference models of ``models.load``).
MODELS: Registry[ModelSpec] = Registry("model", error=ModelError)


def per_layer(value: int | Sequence[int], count: int | None, what: str, *,
              allow_empty: bool = False) -> tuple[int, ...]:
    """Expand a width given once (``64``, repeated ``count`` times) or per layer.

    ``count`` is None when the number of layers is free (a single int then means one layer).
    Raises :class:`ModelError` for anything but positive integers.
    """
    if isinstance(value, bool):
        raise ModelError(f"{what} must be a positive integer or a list of them, got {value!r}")
    if isinstance(value, int):
        widths: tuple[int, ...] = (value,) * (1 if count is None else count)
    elif isinstance(value, Sequence) and not isinstance(value, str):
        widths = tuple(value)
        if count is not None and len(widths) != count:
            raise ModelError(f"{what} lists {len(widths)} widths but {count} layers are asked")
    else:
        raise ModelError(f"{what} must be a positive integer or a list of them, got {value!r}")
    bad = any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths)
    if bad or (not widths and not allow_empty):
        raise ModelError(f"{what} must be positive integers, got {value!r}")
    return widths


def check_rank(arch: str, input_shape: Sequence[int], rank: int, layout: str) -> tuple[int, ...]:
    """Validate a per-sample input shape (no batch dim) of the given rank; return it."""
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        raise ModelError(f"model {arch!r}: input_shape must be a list of integers, "
                         f"got {input_shape!r}") from None
    if len(shape) != rank or any(d < 1 for d in shape):
        raise ModelError(f"model {arch!r} needs inputs shaped {layout} per sample, "
                         f"got {shape}")
    return shape


def check_classes(arch: str, num_classes: int) -> int:
    """Validate the number of classes (at least 2)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ModelError(f"model {arch!r}: num_classes must be an integer >= 2, "
                         f"got {num_classes!r}")
    return num_classes


def fc_stack(arch: str, in_features: int, widths: Sequence[int], num_classes: int,
             layers: OrderedDict[str, nn.Module] | None = None) -> nn.Sequential:
    """``fc1, relu1, ..., fcN`` from ``in_features`` through ``widths`` to ``num_classes``,
    appended to ``layers`` (e.g. a leading ``flatten``)."""
    layers = OrderedDict() if layers is None else layers
    prev = in_features
    for i, width in enumerate(widths, start=1):
        layers[f"fc{i}"] = nn.Linear(prev, width)
        layers[f"relu{i}"] = nn.ReLU()
        prev = width
    layers[f"fc{len(widths) + 1}"] = nn.Linear(prev, check_classes(arch, num_classes))
    return nn.Sequential(layers)
