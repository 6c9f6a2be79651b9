"""The reference-model table: one :class:`ModelSpec` per name, and ``build``.

Each row is the single place that says which class a name builds, which bundled dataset it
trains on by default and for how long (Adam with a cosine-decayed learning rate, batch
128). Epochs and learning rates were chosen so that all seven models train in about two
minutes together on two CPU cores, each near or above its published MNIST-1D baseline.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from nncompress.errors import ModelError
from nncompress.models.base import ARCHITECTURES, MODELS, ArchModule, ModelSpec
from nncompress.models.cnn import CNN1d, CNN2d
from nncompress.models.mlp import MLP
from nncompress.models.recurrent import GRUClassifier, LSTMClassifier
from nncompress.models.rescnn import ResCNN
from nncompress.models.transformer import TinyTransformer

__all__ = ["build", "model_names", "spec"]

_SPECS = (
    ModelSpec("mlp", MLP, "digits", epochs=60, lr=1e-3,
              description="LeNet-300-100 fully connected net (LeCun et al. 1998)"),
    ModelSpec("cnn1d", CNN1d, "mnist1d", epochs=20, lr=3e-3,
              description="3-layer 1-D CNN with BatchNorm and global average pooling"),
    ModelSpec("gru", GRUClassifier, "mnist1d", epochs=15, lr=1e-2,
              description="2-layer GRU over the 40 time steps, Linear on the last output"),
    ModelSpec("lstm", LSTMClassifier, "mnist1d", epochs=25, lr=1e-2,
              description="2-layer LSTM over the 40 time steps, Linear on the last output"),
    ModelSpec("cnn2d", CNN2d, "digits", epochs=60, lr=3e-3,
              description="LeNet-5-like 2-D CNN for 8x8 digits (LeCun et al. 1998)"),
    ModelSpec("rescnn", ResCNN, "mnist1d", epochs=20, lr=3e-3,
              description="residual 1-D CNN of depthwise-separable inverted-residual blocks"),
    ModelSpec("transformer", TinyTransformer, "mnist1d", epochs=30, lr=3e-3,
              description="tiny pre-LN transformer encoder on 4-sample patches"),
)

for _spec in _SPECS:
    MODELS.register(_spec.name, _spec)
    ARCHITECTURES.register(_spec.cls.arch_name, _spec.cls)
del _spec


def model_names() -> tuple[str, ...]:
    """Names of the reference models, sorted."""
    return MODELS.names()


def spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``name``; unknown names raise ModelError listing known ones."""
    return MODELS.get(name)


def _check_overrides(name: str, cls: type[ArchModule], overrides: dict[str, Any]) -> None:
    params = inspect.signature(cls.__init__).parameters
    options = [p for p in params if p not in ("self", "input_shape", "num_classes")]
    for key in overrides:
        if key not in options:
            raise ModelError(f"model {name!r} has no option {key!r}; options: "
                             f"{', '.join(options)}")


def build(name: str, input_shape: Sequence[int], num_classes: int,
          **overrides: Any) -> ArchModule:
    """A freshly initialised reference model ``name`` for the given input shape / classes.

    ``overrides`` are constructor options (e.g. ``hidden=[128]``, ``channels=[16, 32]``).
    Initialisation uses torch's global RNG: seed it first for reproducible weights.
    """
    cls = spec(name).cls
    _check_overrides(name, cls, overrides)
    try:
        return cls(input_shape, num_classes, **overrides)
    except ModelError:
        raise
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ModelError(f"model {name!r} cannot be built with {overrides!r}: {exc}") from exc
