"""Fully connected reference model: LeNet-300-100.

LeCun, Bottou, Bengio & Haffner, "Gradient-based learning applied to document
recognition" (1998); the model Han et al. (2015) prune to 8% of its weights.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from nncompress.errors import ModelError
from nncompress.models.base import ArchModule, fc_stack, per_layer

__all__ = ["MLP"]


class MLP(ArchModule):
    """flatten -> [Linear -> ReLU] * len(hidden) -> Linear.

    Input ``[B, *input_shape]`` (any shape; flattened), output logits ``[B, num_classes]``.
    Layers are ``layers.fc1`` ... ``layers.fc{n+1}`` (the last one is the classifier).
    """

    arch_name = "mlp"

    def __init__(self, input_shape: Sequence[int], num_classes: int,
                 hidden: int | Sequence[int] = (300, 100)) -> None:
        super().__init__()
        self.input_shape = tuple(int(d) for d in input_shape)
        if not self.input_shape or any(d < 1 for d in self.input_shape):
            raise ModelError(f"model 'mlp': bad input_shape {input_shape!r}")
        widths = per_layer(hidden, None, "mlp hidden", allow_empty=True)
        self.layers = fc_stack("mlp", math.prod(self.input_shape), widths, num_classes,
                               OrderedDict(flatten=nn.Flatten()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def arch_config(self) -> dict[str, Any]:
        linears = [m for m in self.layers if isinstance(m, nn.Linear)]
        return {
            "input_shape": list(self.input_shape),
            "num_classes": linears[-1].out_features,
            "hidden": [fc.out_features for fc in linears[:-1]],
        }
