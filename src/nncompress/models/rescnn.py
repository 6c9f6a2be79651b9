"""Residual 1-D CNN built from depthwise-separable convolutions.

Each block is an inverted residual (Sandler et al., "MobileNetV2", 2018): pointwise 1x1
expansion -> depthwise conv (Howard et al., "MobileNets", 2017) -> pointwise 1x1
projection, each followed by BatchNorm, and an identity shortcut (He et al., "Deep
Residual Learning", 2016). The block's inner width is free to prune on its own; the
residual stream's width couples the stem, every block's input/output and the head.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from nncompress.errors import ModelError
from nncompress.models.base import ArchModule, check_classes, check_rank, per_layer

__all__ = ["InvertedResidual1d", "ResCNN"]


class InvertedResidual1d(nn.Module):
    """``x + project(depthwise(expand(x)))`` on ``[B, channels, L]`` (shape preserved).

    ``expand``: Conv1d(channels -> hidden, 1); ``depthwise``: Conv1d(hidden -> hidden, k,
    groups=hidden); ``project``: Conv1d(hidden -> channels, 1); each followed by BatchNorm,
    the first two by ReLU. No activation after the add (a linear bottleneck).
    """

    def __init__(self, channels: int, hidden: int, kernel_size: int) -> None:
        super().__init__()
        self.expand = nn.Conv1d(channels, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.depthwise = nn.Conv1d(hidden, hidden, kernel_size, padding=kernel_size // 2,
                                   groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm1d(hidden)
        self.project = nn.Conv1d(hidden, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm1d(channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn1(self.expand(x)))
        h = self.act(self.bn2(self.depthwise(h)))
        return x + self.bn3(self.project(h))


class ResCNN(ArchModule):
    """``[B, C, L]`` -> stem (Conv1d k5 stride ``stem_stride`` -> BN -> ReLU) ->
    ``len(hidden)`` inverted residual blocks -> global average pool -> Linear.

    Layers: ``stem.0`` (conv), ``stem.1`` (bn), ``blocks.{i}.{expand,depthwise,project}``,
    ``classifier``.
    """

    arch_name = "rescnn"

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: int = 32,
                 hidden: int | Sequence[int] = (64, 64, 64), kernel_size: int = 5,
                 stem_stride: int = 2) -> None:
        super().__init__()
        self.input_shape = check_rank("rescnn", input_shape, 2, "(channels, length)")
        width = per_layer(channels, 1, "rescnn channels")[0]
        inner = per_layer(hidden, None, "rescnn hidden", allow_empty=True)
        for name, value in (("kernel_size", kernel_size), ("stem_stride", stem_stride)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelError(f"model 'rescnn': {name} must be a positive integer, "
                                 f"got {value!r}")
        if kernel_size % 2 == 0:
            raise ModelError(f"model 'rescnn': kernel_size must be odd, got {kernel_size}")
        self.stem = nn.Sequential(
            nn.Conv1d(self.input_shape[0], width, 5, stride=stem_stride, padding=2, bias=False),
            nn.BatchNorm1d(width),
            nn.ReLU(),
        )
        self.blocks = nn.Sequential(*(InvertedResidual1d(width, h, kernel_size) for h in inner))
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(width, check_classes("rescnn", num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.blocks(self.stem(x)))))

    def arch_config(self) -> dict[str, Any]:
        stem_conv: nn.Conv1d = self.stem[0]
        blocks: list[InvertedResidual1d] = list(self.blocks)
        return {
            "input_shape": list(self.input_shape),
            "num_classes": self.classifier.out_features,
            "channels": stem_conv.out_channels,
            "hidden": [b.expand.out_channels for b in blocks],
            "kernel_size": blocks[0].depthwise.kernel_size[0] if blocks else 5,
            "stem_stride": stem_conv.stride[0],
        }
