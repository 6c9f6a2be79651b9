"""Plain convolutional reference models: a 1-D CNN for MNIST-1D and a LeNet-5-like 2-D CNN.

- ``cnn1d``: three Conv1d-BatchNorm-ReLU stages (stride 2), global average pooling, Linear.
  MNIST-1D's published CNN baseline is 94% test accuracy (Greydanus, "Scaling down deep
  learning", 2020); BatchNorm (Ioffe & Szegedy, 2015) lets it get there in seconds.
- ``cnn2d``: LeNet-5 (LeCun et al., 1998) shrunk for 8x8 digits: conv-relu-pool twice, then
  three fully connected layers.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from nncompress.errors import ModelError
from nncompress.models.base import ArchModule, check_classes, check_rank, fc_stack, per_layer

__all__ = ["CNN1d", "CNN2d"]


def _odd_kernel(arch: str, kernel_size: int) -> int:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 \
            or kernel_size % 2 == 0:
        raise ModelError(f"model {arch!r}: kernel_size must be a positive odd integer, "
                         f"got {kernel_size!r}")
    return kernel_size


class CNN1d(ArchModule):
    """``[B, C, L]`` -> ``len(channels)`` x (Conv1d stride ``stride`` -> BN -> ReLU) ->
    global average pool -> Linear -> logits ``[B, num_classes]``.

    Layers: ``features.conv{i}``, ``features.bn{i}``, ``classifier``. Any length L >= 1 works.
    """

    arch_name = "cnn1d"

    def __init__(self, input_shape: Sequence[int], num_classes: int,
                 channels: int | Sequence[int] = (32, 64, 128), kernel_size: int = 5,
                 stride: int = 2) -> None:
        super().__init__()
        self.input_shape = check_rank("cnn1d", input_shape, 2, "(channels, length)")
        widths = per_layer(channels, None, "cnn1d channels")
        k = _odd_kernel("cnn1d", kernel_size)
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ModelError(f"model 'cnn1d': stride must be a positive integer, got {stride!r}")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        prev = self.input_shape[0]
        for i, width in enumerate(widths, start=1):
            layers[f"conv{i}"] = nn.Conv1d(prev, width, k, stride=stride, padding=k // 2,
                                           bias=False)
            layers[f"bn{i}"] = nn.BatchNorm1d(width)
            layers[f"relu{i}"] = nn.ReLU()
            prev = width
        self.features = nn.Sequential(layers)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(prev, check_classes("cnn1d", num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))

    def arch_config(self) -> dict[str, Any]:
        convs = [m for m in self.features if isinstance(m, nn.Conv1d)]
        return {
            "input_shape": list(self.input_shape),
            "num_classes": self.classifier.out_features,
            "channels": [c.out_channels for c in convs],
            "kernel_size": convs[0].kernel_size[0],
            "stride": convs[0].stride[0],
        }


class CNN2d(ArchModule):
    """LeNet-5-like: ``[B, C, H, W]`` -> 2 x (Conv2d 'same' -> ReLU -> MaxPool 2) ->
    flatten -> ``len(hidden)`` x (Linear -> ReLU) -> Linear -> logits ``[B, num_classes]``.

    Layers: ``features.conv1``, ``features.conv2``, ``classifier.fc1`` ... Needs H, W >= 4.
    """

    arch_name = "cnn2d"

    def __init__(self, input_shape: Sequence[int], num_classes: int,
                 channels: Sequence[int] = (6, 16), hidden: Sequence[int] = (120, 84),
                 kernel_size: int = 3) -> None:
        super().__init__()
        self.input_shape = check_rank("cnn2d", input_shape, 3, "(channels, height, width)")
        c_in, height, width = self.input_shape
        convs = per_layer(channels, None, "cnn2d channels")
        k = _odd_kernel("cnn2d", kernel_size)
        if height >> len(convs) < 1 or width >> len(convs) < 1:
            raise ModelError(f"model 'cnn2d' pools {len(convs)} times and needs inputs of at "
                             f"least {2 ** len(convs)}x{2 ** len(convs)}, got {height}x{width}")
        feats: OrderedDict[str, nn.Module] = OrderedDict()
        prev = c_in
        for i, out in enumerate(convs, start=1):
            feats[f"conv{i}"] = nn.Conv2d(prev, out, k, padding=k // 2)
            feats[f"relu{i}"] = nn.ReLU()
            feats[f"pool{i}"] = nn.MaxPool2d(2)
            prev = out
        self.features = nn.Sequential(feats)
        self.flatten = nn.Flatten()
        prev = prev * (height >> len(convs)) * (width >> len(convs))
        widths = per_layer(hidden, None, "cnn2d hidden", allow_empty=True)
        self.classifier = fc_stack("cnn2d", prev, widths, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))

    def arch_config(self) -> dict[str, Any]:
        convs = [m for m in self.features if isinstance(m, nn.Conv2d)]
        linears = [m for m in self.classifier if isinstance(m, nn.Linear)]
        return {
            "input_shape": list(self.input_shape),
            "num_classes": linears[-1].out_features,
            "channels": [c.out_channels for c in convs],
            "hidden": [fc.out_features for fc in linears[:-1]],
            "kernel_size": convs[0].kernel_size[0],
        }
