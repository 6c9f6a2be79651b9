"""Sparse convolution: a pruned Conv1d/Conv2d run as im2col + CSR matrix product.

The convolution's weight ``[out, in, *kernel]`` is viewed as the matrix
``[out, in * prod(kernel)]`` and held in CSR; the input is unfolded into patch columns
``[B, in * prod(kernel), L]`` (``torch.nn.functional.unfold``; a Conv1d is run as a
Conv2d of height 1) and multiplied by the sparse matrix, touching only the non-zero
weights (Han et al. 2016, EIE, applies the same idea to the convolution's matrix form).
:meth:`SparseConv.reference` is the dense ``conv1d`` / ``conv2d`` with the same weights.

Unfolding materialises every patch, so on small convolutions this path is usually slower
than the dense kernel; :func:`nncompress.kernels.sparsify` times both and keeps the dense
one where it is faster, and reports it. Grouped (incl. depthwise) convolutions and
padding modes other than ``zeros`` are not offered a sparse path (the report says so).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nncompress.errors import UnsupportedLayerError
from nncompress.kernels._csr import CSRWeight

__all__ = ["SparseConv", "conv_unsupported"]


def conv_unsupported(conv: nn.Module) -> str | None:
    """Why ``conv`` has no sparse path, or ``None`` when it has one."""
    if not isinstance(conv, (nn.Conv1d, nn.Conv2d)):
        return f"{type(conv).__name__} is not a Conv1d/Conv2d"
    if conv.groups != 1:
        return f"grouped convolution (groups={conv.groups})"
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r}"
    if isinstance(conv.padding, str):
        return f"padding {conv.padding!r} (give it as numbers)"
    return None


def _pair(values: tuple[int, ...], one_d: bool, fill: int) -> tuple[int, int]:
    return (fill, int(values[0])) if one_d else (int(values[0]), int(values[1]))


class SparseConv(CSRWeight):
    """A Conv1d/Conv2d (``groups=1``, zero padding) whose weight is held in CSR.

    Input ``[B, in, L]`` (1-d) or ``[B, in, H, W]`` (2-d), output as the dense conv's.
    Buffers ``crow_indices [out + 1]``, ``col_indices [nnz]``, ``values [nnz]``; optional
    ``bias [out]``. Inference only.
    """

    def __init__(self, conv: nn.Conv1d | nn.Conv2d) -> None:
        why = conv_unsupported(conv)
        if why is not None:
            raise UnsupportedLayerError(f"no sparse path for this convolution: {why}")
        one_d = isinstance(conv, nn.Conv1d)
        self.one_d = one_d
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = _pair(conv.kernel_size, one_d, 1)
        self.stride = _pair(conv.stride, one_d, 1)
        self.padding = _pair(conv.padding, one_d, 0)  # type: ignore[arg-type]
        self.dilation = _pair(conv.dilation, one_d, 1)
        super().__init__(conv.weight.reshape(conv.out_channels, -1), conv.bias)

    def dense_weight(self) -> torch.Tensor:
        """The dense weight ``[out, in, *kernel]`` (zeros where pruned)."""
        shape = (self.out_channels, self.in_channels,
                 *(self.kernel_size[1:] if self.one_d else self.kernel_size))
        return self.dense_matrix().reshape(shape)

    def _out_size(self, size: int, axis: int) -> int:
        k, s, p, d = (self.kernel_size[axis], self.stride[axis], self.padding[axis],
                      self.dilation[axis])
        return (size + 2 * p - d * (k - 1) - 1) // s + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x4 = x.unsqueeze(2) if self.one_d else x
        batch, _, height, width = x4.shape
        cols = F.unfold(x4, self.kernel_size, dilation=self.dilation, padding=self.padding,
                        stride=self.stride)  # [B, in * k, L]
        positions = cols.shape[2]
        if batch == 1:
            out = torch.sparse.mm(self._csr, cols[0]).unsqueeze(0)  # [1, out, L]
        else:
            flat = cols.permute(1, 0, 2).reshape(cols.shape[1], batch * positions)
            out = torch.sparse.mm(self._csr, flat).reshape(self.out_channels, batch,
                                                          positions).permute(1, 0, 2)
        if self.bias is not None:
            out = out + self.bias[:, None]
        if self.one_d:
            return out.reshape(batch, self.out_channels, positions)
        return out.reshape(batch, self.out_channels, self._out_size(height, 0),
                           self._out_size(width, 1))

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Plain-torch dense convolution with the same weights."""
        if self.one_d:
            return F.conv1d(x, self.dense_weight(), self.bias, self.stride[1],
                            self.padding[1], self.dilation[1])
        return F.conv2d(x, self.dense_weight(), self.bias, self.stride, self.padding,
                        self.dilation)

    def to_dense(self) -> nn.Conv1d | nn.Conv2d:
        """The equivalent dense ``nn.Conv1d`` / ``nn.Conv2d``."""
        weight = self.dense_weight()
        if self.one_d:
            conv: nn.Conv1d | nn.Conv2d = nn.Conv1d(
                self.in_channels, self.out_channels, self.kernel_size[1], self.stride[1],
                self.padding[1], self.dilation[1], bias=self.bias is not None)
        else:
            conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size,
                             self.stride, self.padding, self.dilation,
                             bias=self.bias is not None)
        conv = conv.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        kind = "1d" if self.one_d else "2d"
        return (f"{kind}, {self.in_channels}, {self.out_channels}, "
                f"kernel_size={self.kernel_size}, nnz={self.nnz}")
