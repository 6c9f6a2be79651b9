"""Efficient-block CNNs for students: depthwise-separable (MobileNet) and group conv +
channel shuffle (ShuffleNet) networks, 1-D and 2-D.

- MobileNet (Howard et al., "MobileNets: Efficient Convolutional Neural Networks for
  Mobile Vision Applications", 2017): a full stem convolution, then blocks of depthwise
  k-conv -> BN -> ReLU -> pointwise 1x1 conv -> BN -> ReLU.
- ShuffleNet (Zhang, Zhou, Lin & Sun, "ShuffleNet: An Extremely Efficient Convolutional
  Neural Network for Mobile Devices", 2018): units of grouped 1x1 conv -> BN -> ReLU ->
  channel shuffle -> depthwise k-conv -> BN -> grouped 1x1 conv -> BN, with an identity
  shortcut added (stride 1, same width) or an average-pooled shortcut concatenated
  (stride > 1, the branch adds ``out - in`` channels), then ReLU.

Both end in global average pooling and one Linear, so a student's size is set by its
channel widths alone (what ``models.students`` searches). Every layer is listed in the
config (``channels`` / ``stride`` / ``mid`` per layer), read back from the live layers by
``arch_config``, so ``nncompress.save`` / ``load`` rebuild them through
:data:`~nncompress.models.base.ARCHITECTURES` (registered below) like any reference model.
Channel shuffle is reshape / transpose (ONNX Reshape / Transpose; the int8 converter's
shape ops).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from nncompress.errors import ModelError
from nncompress.models.base import ARCHITECTURES, ArchModule, check_classes, check_rank, per_layer

__all__ = ["ChannelShuffle", "DepthwiseSeparable", "MobileNet1d", "MobileNet2d",
           "ShuffleNet1d", "ShuffleNet2d", "ShuffleUnit"]

#: spatial rank -> (conv, batch norm, average pool, global average pool) classes
_LAYERS: dict[int, tuple[type[nn.Module], ...]] = {
    1: (nn.Conv1d, nn.BatchNorm1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d),
    2: (nn.Conv2d, nn.BatchNorm2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d),
}


def _conv(dims: int, c_in: int, c_out: int, k: int, stride: int = 1,
          groups: int = 1) -> nn.Module:
    return _LAYERS[dims][0](c_in, c_out, k, stride=stride, padding=k // 2, groups=groups,
                            bias=False)


def _bn(dims: int, channels: int) -> nn.Module:
    return _LAYERS[dims][1](channels)


class ChannelShuffle(nn.Module):
    """``[B, C, *S]`` (``dims`` spatial axes) -> the same shape with channels regrouped:
    ``[B, g, C/g, *S]`` -> transpose the first two -> ``[B, C, *S]`` (Zhang et al. 2018).
    C must divide by g. Written as reshape / transpose with sizes read from ``x.shape`` so
    that ONNX export and the int8 converter both follow it."""

    def __init__(self, groups: int, dims: int = 1) -> None:
        super().__init__()
        self.groups = groups
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = [x.shape[2 + i] for i in range(self.dims)]
        grouped = x.reshape(x.shape[0], self.groups, -1, *spatial)     # [B, g, C/g, *S]
        return grouped.transpose(1, 2).reshape(x.shape[0], -1, *spatial)


class DepthwiseSeparable(nn.Module):
    """``[B, in, *S]`` -> ``[B, out, *S / stride]``: depthwise k-conv (stride) -> BN -> ReLU
    -> pointwise 1x1 -> BN -> ReLU (Howard et al. 2017)."""

    def __init__(self, dims: int, c_in: int, c_out: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.depthwise = _conv(dims, c_in, c_in, kernel_size, stride, groups=c_in)
        self.bn1 = _bn(dims, c_in)
        self.pointwise = _conv(dims, c_in, c_out, 1)
        self.bn2 = _bn(dims, c_out)
        self.act = nn.ReLU()

    @property
    def out_channels(self) -> int:
        return self.pointwise.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn2(self.pointwise(self.act(self.bn1(self.depthwise(x))))))


def shortcut_kind(c_in: int, c_out: int, stride: int, groups: int) -> str:
    """How a ShuffleNet unit joins its input: ``"add"`` (stride 1, same width),
    ``"concat"`` (stride > 1 and ``out - in`` a positive multiple of ``groups``) or
    ``"none"`` (anything else: the branch alone)."""
    if stride == 1 and c_in == c_out:
        return "add"
    if stride > 1 and c_out > c_in and (c_out - c_in) % groups == 0:
        return "concat"
    return "none"


class ShuffleUnit(nn.Module):
    """``[B, in, *S]`` -> ``[B, out, *S / stride]`` (Zhang et al. 2018, Fig. 2): grouped 1x1
    (in -> mid; ungrouped when in does not divide by groups) -> BN -> ReLU -> shuffle ->
    depthwise k-conv (stride) -> BN -> grouped 1x1 (mid -> branch) -> BN, joined with the
    input by :func:`shortcut_kind` (concat: a 3-wide average pool of the input, branch =
    out - in channels), then ReLU. ``mid`` must divide by ``groups``."""

    def __init__(self, dims: int, c_in: int, c_out: int, mid: int, groups: int,
                 kernel_size: int, stride: int) -> None:
        super().__init__()
        if mid % groups:
            raise ModelError(f"ShuffleNet unit: mid width {mid} does not divide by groups "
                             f"{groups}")
        self.shortcut = shortcut_kind(c_in, c_out, stride, groups)
        branch = c_out - c_in if self.shortcut == "concat" else c_out
        out_groups = groups if branch % groups == 0 else 1
        self.gconv1 = _conv(dims, c_in, mid, 1, groups=groups if c_in % groups == 0 else 1)
        self.bn1 = _bn(dims, mid)
        self.shuffle = ChannelShuffle(groups, dims)
        self.depthwise = _conv(dims, mid, mid, kernel_size, stride, groups=mid)
        self.bn2 = _bn(dims, mid)
        self.gconv2 = _conv(dims, mid, branch, 1, groups=out_groups)
        self.bn3 = _bn(dims, branch)
        self.pool = _LAYERS[dims][2](3, stride=stride, padding=1) \
            if self.shortcut == "concat" else nn.Identity()
        self.act = nn.ReLU()

    @property
    def out_channels(self) -> int:
        extra = self.gconv1.in_channels if self.shortcut == "concat" else 0
        return self.gconv2.out_channels + extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.shuffle(self.act(self.bn1(self.gconv1(x))))
        h = self.bn3(self.gconv2(self.bn2(self.depthwise(h))))
        if self.shortcut == "add":
            h = h + x
        elif self.shortcut == "concat":
            h = torch.cat((self.pool(x), h), dim=1)
        return self.act(h)


class _EfficientCNN(ArchModule):
    """Stem (full k-conv, stride ``stride[0]`` -> BN -> ReLU to ``channels[0]``) -> one block
    per further entry of ``channels`` -> global average pool -> Linear -> ``[B, classes]``.

    Layers: ``stem.0`` (conv), ``stem.1`` (bn), ``blocks.{i}``, ``classifier``.
    """

    dims: ClassVar[int]

    def _check(self, input_shape: Sequence[int], num_classes: int, channels: Any,
               kernel_size: int, stride: Any) -> tuple[tuple[int, ...], tuple[int, ...], int]:
        arch = self.arch_name
        layout = "(channels, length)" if self.dims == 1 else "(channels, height, width)"
        self.input_shape = check_rank(arch, input_shape, self.dims + 1, layout)
        widths = per_layer(channels, None, f"{arch} channels")
        strides = per_layer(stride, len(widths), f"{arch} stride")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) \
                or kernel_size < 1 or kernel_size % 2 == 0:
            raise ModelError(f"model {arch!r}: kernel_size must be a positive odd integer, "
                             f"got {kernel_size!r}")
        check_classes(arch, num_classes)
        return widths, strides, kernel_size

    def _finish(self, c_first: int, k: int, stride: int, blocks: list[nn.Module],
                num_classes: int) -> None:
        self.stem = nn.Sequential(_conv(self.dims, self.input_shape[0], c_first, k, stride),
                                  _bn(self.dims, c_first), nn.ReLU())
        self.blocks = nn.Sequential(*blocks)
        self.pool = _LAYERS[self.dims][3](1)
        self.flatten = nn.Flatten()
        last = blocks[-1].out_channels if blocks else c_first
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.blocks(self.stem(x)))))

    def _layers_config(self) -> dict[str, Any]:
        stem: nn.Module = self.stem[0]
        blocks = list(self.blocks)
        return {
            "input_shape": list(self.input_shape),
            "num_classes": self.classifier.out_features,
            "channels": [stem.out_channels, *(b.out_channels for b in blocks)],
            "kernel_size": stem.kernel_size[0],
            "stride": [stem.stride[0], *(b.depthwise.stride[0] for b in blocks)],
        }


class _MobileNet(_EfficientCNN):
    """MobileNet student (Howard et al. 2017): the stem, then one depthwise-separable block
    per further width in ``channels`` (each with its own entry of ``stride``)."""

    def __init__(self, input_shape: Sequence[int], num_classes: int,
                 channels: int | Sequence[int] = (32, 64, 128), kernel_size: int = 5,
                 stride: int | Sequence[int] = 2) -> None:
        super().__init__()
        widths, strides, k = self._check(input_shape, num_classes, channels, kernel_size,
                                         stride)
        blocks: list[nn.Module] = [DepthwiseSeparable(self.dims, c_in, c_out, k, s)
                                   for c_in, c_out, s in zip(widths[:-1], widths[1:], strides[1:],
                                                              strict=True)]
        self._finish(widths[0], k, strides[0], blocks, num_classes)

    def arch_config(self) -> dict[str, Any]:
        return self._layers_config()


class _ShuffleNet(_EfficientCNN):
    """ShuffleNet student (Zhang et al. 2018): the stem, then one :class:`ShuffleUnit` per
    further width in ``channels``, with bottleneck widths ``mid`` (one per unit, each a
    multiple of ``groups``) and its own entry of ``stride``."""

    def __init__(self, input_shape: Sequence[int], num_classes: int,
                 channels: int | Sequence[int] = (24, 48, 48, 96, 96),
                 mid: int | Sequence[int] = (12, 12, 24, 24), groups: int = 2,
                 kernel_size: int = 5, stride: int | Sequence[int] = (2, 2, 1, 2, 1)) -> None:
        super().__init__()
        widths, strides, k = self._check(input_shape, num_classes, channels, kernel_size,
                                         stride)
        mids = per_layer(mid, len(widths) - 1, f"{self.arch_name} mid", allow_empty=True)
        g = per_layer(groups, 1, f"{self.arch_name} groups")[0]
        blocks: list[nn.Module] = [
            ShuffleUnit(self.dims, c_in, c_out, m, g, k, s)
            for c_in, c_out, m, s in zip(widths[:-1], widths[1:], mids, strides[1:], strict=True)]
        self._finish(widths[0], k, strides[0], blocks, num_classes)

    def arch_config(self) -> dict[str, Any]:
        units: list[ShuffleUnit] = list(self.blocks)
        return {**self._layers_config(), "mid": [u.gconv1.out_channels for u in units],
                "groups": units[0].shuffle.groups if units else 2}


class MobileNet1d(_MobileNet):
    """1-D MobileNet student on ``[B, C, L]`` (see :class:`_MobileNet`)."""

    arch_name = "mobilenet1d"
    dims = 1


class MobileNet2d(_MobileNet):
    """2-D MobileNet student on ``[B, C, H, W]`` (see :class:`_MobileNet`)."""

    arch_name = "mobilenet2d"
    dims = 2

    def __init__(self, input_shape: Sequence[int], num_classes: int,
                 channels: int | Sequence[int] = (16, 32, 64), kernel_size: int = 3,
                 stride: int | Sequence[int] = (1, 2, 2)) -> None:
        super().__init__(input_shape, num_classes, channels, kernel_size, stride)


class ShuffleNet1d(_ShuffleNet):
    """1-D ShuffleNet student on ``[B, C, L]`` (see :class:`_ShuffleNet`)."""

    arch_name = "shufflenet1d"
    dims = 1


class ShuffleNet2d(_ShuffleNet):
    """2-D ShuffleNet student on ``[B, C, H, W]`` (see :class:`_ShuffleNet`)."""

    arch_name = "shufflenet2d"
    dims = 2

    def __init__(self, input_shape: Sequence[int], num_classes: int,
                 channels: int | Sequence[int] = (16, 32, 32, 64, 64),
                 mid: int | Sequence[int] = (8, 8, 16, 16), groups: int = 2,
                 kernel_size: int = 3, stride: int | Sequence[int] = (1, 2, 1, 2, 1)) -> None:
        super().__init__(input_shape, num_classes, channels, mid, groups, kernel_size, stride)


for _cls in (MobileNet1d, MobileNet2d, ShuffleNet1d, ShuffleNet2d):
    ARCHITECTURES.register(_cls.arch_name, _cls)
del _cls
