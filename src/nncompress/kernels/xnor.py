"""Bit-packed XNOR-popcount binary Linear and Conv1d / Conv2d for x86_64, beside their
plain-torch references.

Rastegari, Ordonez, Redmon & Farhadi (2016), "XNOR-Net: ImageNet classification using
binary convolutional neural networks", and Courbariaux, Hubara, Soudry, El-Yaniv & Bengio
(2016), "Binarized neural networks": when both a layer's weights and its inputs are +-1, a
dot product of K terms is ``K - 2 popcount(a XOR w)`` on their sign bits, 64 terms per
machine word. A binary layer here computes, for inputs ``x`` and sign weights ``W``::

    a   = where(x < t, -1, +1)          # t: per input feature / channel threshold (or 0)
    out = (a . W) * alpha + bias        # alpha [out] (XNOR-Net's scale; ones without it)

:func:`xnor_linear` / :func:`xnor_conv` run the C kernel (``kernels/c/xnor.c``, built by
:mod:`nncompress.kernels.cbuild`); :func:`xnor_linear_reference` /
:func:`xnor_conv_reference` compute the same in plain torch (float matmul of +-1 values,
exact for K < 2**24) and the tests require equal outputs, bit for bit, at sizes that are
not multiples of 64. Convolutions use zero padding exactly (a padded position adds 0,
neither +1 nor -1), groups 1. Weights are packed once with :func:`pack_signs`
(``[out, words]`` int64, ``words = ceil(K / 64)``; bit i of word w is element 64 w + i,
set for -1, the padding clear).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nncompress.errors import KernelUnavailableError
from nncompress.kernels.cbuild import load_library

__all__ = ["ConvPlan", "LinearPlan", "available", "binarize", "kernel_status",
           "pack_activations", "pack_signs", "unavailable_reason", "words_for", "xnor_conv",
           "xnor_conv_reference", "xnor_linear", "xnor_linear_reference"]

_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES: dict[str, list[type]] = {
    "xnor_pack": [_P, _I, _I, _P, _P],
    "xnor_linear": [_P, _I, _I, _P, _P, _I, _P, _P, _P],
    "xnor_linear_layer": [_P, _P, _I, _P],
    "xnor_conv2d": [_P, _P, _P, _P, _I, _P, _P, _P],
}


class _LinearLayer(ctypes.Structure):
    """``LinearLayer`` of xnor.c: a binary Linear's prepared operands."""

    _fields_ = [("k", _I), ("n", _I), ("thr", _P), ("w", _P), ("alpha", _P), ("bias", _P)]


@functools.cache
def _library() -> ctypes.CDLL | KernelUnavailableError:
    """The loaded kernel with its signatures set, or the reason it is unavailable."""
    try:
        lib = load_library("xnor")
    except KernelUnavailableError as exc:
        return exc
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = ctypes.c_int if name != "xnor_pack" else None
    lib.xnor_simd.restype = ctypes.c_int
    return lib


def _lib() -> ctypes.CDLL:
    lib = _library()
    if isinstance(lib, KernelUnavailableError):
        raise lib
    return lib


def available() -> bool:
    """Whether the C kernel builds and loads on this machine."""
    return not isinstance(_library(), KernelUnavailableError)


def unavailable_reason() -> str | None:
    """Why the kernel is unavailable (one line), or ``None`` when it is available."""
    lib = _library()
    return str(lib) if isinstance(lib, KernelUnavailableError) else None


def kernel_status() -> str:
    """One line for people: which popcount path the kernel uses, or why it is missing."""
    lib = _library()
    if isinstance(lib, KernelUnavailableError):
        return f"unavailable ({lib})"
    return "AVX-512 VPOPCNTDQ" if lib.xnor_simd() else "scalar popcount"


def words_for(k: int) -> int:
    """64-bit words per packed row of ``k`` signs."""
    return (int(k) + 63) // 64


def binarize(x: torch.Tensor, threshold: torch.Tensor | None = None) -> torch.Tensor:
    """``-1`` where ``x < threshold`` (0 without one), else ``+1``, in ``x``'s dtype.

    ``threshold`` broadcasts against ``x`` (callers shape it: ``[K]`` for ``[..., K]``).
    """
    below = x < (threshold if threshold is not None else 0.0)
    return torch.where(below, -1.0, 1.0).to(x.dtype)


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """``[rows, ...]`` signs (negative = -1) -> ``[rows, words]`` int64 packed bits."""
    rows = signs.shape[0]
    bits = (signs.detach().reshape(rows, -1) < 0).cpu().numpy().astype(np.uint8)
    k = bits.shape[1]
    padded = np.zeros((rows, words_for(k) * 64), dtype=np.uint8)
    padded[:, :k] = bits
    packed = np.packbits(padded, axis=1, bitorder="little")
    return torch.from_numpy(np.ascontiguousarray(packed).view("<i8").copy())


def pack_activations(x: torch.Tensor, threshold: torch.Tensor | None = None) -> torch.Tensor:
    """The C kernel's packing of ``x`` ``[rows, K]`` float32 against ``threshold`` ``[K]``:
    ``[rows, words]`` int64 (equal to ``pack_signs(binarize(x, threshold))``)."""
    x = _float_input(x)
    rows, k = x.shape
    out = torch.empty(rows, words_for(k), dtype=torch.int64)
    t = _threshold(threshold, k)
    _lib().xnor_pack(x.data_ptr(), rows, k, _ptr(t), out.data_ptr())
    return out


def _float_input(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(device="cpu", dtype=torch.float32).contiguous()


def _threshold(threshold: torch.Tensor | None, size: int) -> torch.Tensor | None:
    if threshold is None:
        return None
    t = threshold.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if t.numel() != size:
        raise ValueError(f"threshold has {t.numel()} values, expected {size}")
    return t


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(status: int, what: str) -> None:
    if status != 0:
        raise MemoryError(f"xnor kernel: out of memory in {what}")


class _Plan:
    """A binary layer's kernel operands, converted once (float32, contiguous, CPU) and
    held with their addresses, so a call only converts ``x`` when it must."""

    def __init__(self, weight_bits: torch.Tensor, alpha: torch.Tensor,
                 bias: torch.Tensor | None, threshold: torch.Tensor | None,
                 threshold_size: int) -> None:
        self.lib = _lib()
        self.bits = weight_bits.detach().to("cpu", torch.int64).contiguous()
        self.out_features = int(self.bits.shape[0])
        self.alpha = alpha.detach().to("cpu", torch.float32).contiguous()
        self.bias = None if bias is None else bias.detach().to("cpu", torch.float32).contiguous()
        self.threshold = _threshold(threshold, threshold_size)
        if self.alpha.numel() != self.out_features or (
                self.bias is not None and self.bias.numel() != self.out_features):
            raise ValueError(f"alpha / bias must have {self.out_features} values")
        self.pointers = (_ptr(self.threshold), self.bits.data_ptr(), self.out_features,
                         self.alpha.data_ptr(), _ptr(self.bias))


def _as_input(x: torch.Tensor) -> torch.Tensor:
    if x.dtype is torch.float32 and x.device.type == "cpu" and x.is_contiguous():
        return x
    return _float_input(x)


class LinearPlan(_Plan):
    """:func:`xnor_linear` with its weight-side operands prepared once."""

    def __init__(self, weight_bits: torch.Tensor, in_features: int, alpha: torch.Tensor,
                 bias: torch.Tensor | None = None,
                 threshold: torch.Tensor | None = None) -> None:
        super().__init__(weight_bits, alpha, bias, threshold, in_features)
        self.in_features = int(in_features)
        if self.bits.shape[1] != words_for(in_features):
            raise ValueError(f"weight_bits has {self.bits.shape[1]} words per row, "
                             f"{in_features} inputs need {words_for(in_features)}")

        thr, bits, n, alpha, bias = self.pointers
        self.layer = _LinearLayer(self.in_features, n, thr, bits, alpha, bias)
        self.layer_ref = ctypes.byref(self.layer)
        self.run = self.lib.xnor_linear_layer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        k = self.in_features
        if x.dim() == 2 and x.shape[1] == k and x.is_contiguous() and x.dtype is torch.float32 \
                and x.is_cpu:
            flat = x  # the common case, checked cheaply: a batch of rows as they come
        elif x.shape[-1] != k:
            raise ValueError(f"expected inputs [..., {k}], got {list(x.shape)}")
        else:
            flat = _as_input(x.reshape(-1, k))
        rows = flat.shape[0]
        out = torch.empty(rows, self.out_features)
        _check(self.run(self.layer_ref, flat.data_ptr(), rows, out.data_ptr()), "xnor_linear")
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.out_features)


def xnor_linear(x: torch.Tensor, weight_bits: torch.Tensor, in_features: int,
                alpha: torch.Tensor, bias: torch.Tensor | None = None,
                threshold: torch.Tensor | None = None) -> torch.Tensor:
    """Binary Linear in C: ``x`` ``[..., K]`` -> ``[..., N]`` float32.

    ``weight_bits`` ``[N, words]`` from :func:`pack_signs`, ``alpha`` / ``bias`` ``[N]``,
    ``threshold`` ``[K]`` or ``None``. Raises KernelUnavailableError without the kernel.
    A layer called many times keeps a :class:`LinearPlan` instead.
    """
    return LinearPlan(weight_bits, in_features, alpha, bias, threshold)(x)


def xnor_linear_reference(x: torch.Tensor, signs: torch.Tensor, alpha: torch.Tensor,
                          bias: torch.Tensor | None = None,
                          threshold: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch: ``(binarize(x, threshold) @ signs^T) * alpha + bias``; ``signs``
    ``[N, K]`` of +-1 (any dtype)."""
    a = binarize(x.float(), None if threshold is None else threshold.float())
    out = F.linear(a, signs.float()) * alpha.float()
    return out + bias.float() if bias is not None else out


def _pair(v: int | Sequence[int], dims: int) -> tuple[int, ...]:
    return (int(v),) * dims if isinstance(v, int) else tuple(int(i) for i in v)


class ConvPlan(_Plan):
    """:func:`xnor_conv` with its weight-side operands and geometry prepared once."""

    def __init__(self, weight_bits: torch.Tensor, in_channels: int,
                 kernel_size: Sequence[int], alpha: torch.Tensor,
                 bias: torch.Tensor | None = None, threshold: torch.Tensor | None = None,
                 stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                 dilation: int | Sequence[int] = 1) -> None:
        super().__init__(weight_bits, alpha, bias, threshold, in_channels)
        self.dims = len(kernel_size)
        one = self.dims == 1  # a 1-D convolution is a 2-D one of height 1, no padding there
        self.in_channels = int(in_channels)
        self.kernel = (1, *_pair(kernel_size, 1)) if one else _pair(kernel_size, 2)
        self.stride = (1, *_pair(stride, 1)) if one else _pair(stride, 2)
        self.padding = (0, *_pair(padding, 1)) if one else _pair(padding, 2)
        self.dilation = (1, *_pair(dilation, 1)) if one else _pair(dilation, 2)
        k = self.in_channels * self.kernel[0] * self.kernel[1]
        if self.bits.shape[1] != words_for(k):
            raise ValueError(f"weight_bits has {self.bits.shape[1]} words per row, "
                             f"{k} inputs need {words_for(k)}")

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        """Output height and width for an input of ``h`` x ``w``."""
        (kh, kw), (sh, sw) = self.kernel, self.stride
        (ph, pw), (dh, dw) = self.padding, self.dilation
        return ((h + 2 * ph - dh * (kh - 1) - 1) // sh + 1,
                (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected inputs [B, {self.in_channels}, ...] with "
                             f"{self.dims} spatial dims, got {list(x.shape)}")
        xin = _as_input(x if self.dims == 2 else x.unsqueeze(2))
        b, c, h, w = xin.shape
        ho, wo = self.out_size(h, w)
        thr, bits, n, alpha, bias = self.pointers
        out = torch.empty(b, n, max(ho, 0), max(wo, 0), dtype=torch.float32)
        if out.numel():
            geo = (ctypes.c_int64 * 14)(b, c, h, w, *self.kernel, *self.stride,
                                        *self.padding, *self.dilation, ho, wo)
            _check(self.lib.xnor_conv2d(xin.data_ptr(), geo, thr, bits, n, alpha, bias,
                                        out.data_ptr()), "xnor_conv2d")
        return out.squeeze(2) if self.dims == 1 else out


def xnor_conv(x: torch.Tensor, weight_bits: torch.Tensor, kernel_size: Sequence[int],
              alpha: torch.Tensor, bias: torch.Tensor | None = None,
              threshold: torch.Tensor | None = None, stride: int | Sequence[int] = 1,
              padding: int | Sequence[int] = 0,
              dilation: int | Sequence[int] = 1) -> torch.Tensor:
    """Binary Conv1d (``x`` ``[B, C, L]``, ``kernel_size`` ``(k,)``) or Conv2d (``x``
    ``[B, C, H, W]``, ``(kh, kw)``) in C, groups 1, zero padding; ``weight_bits``
    ``[O, words]`` packed from the ``[O, C, *kernel_size]`` signs; ``threshold`` ``[C]``.
    Returns ``[B, O, *out_size]`` float32. A layer keeps a :class:`ConvPlan` instead."""
    return ConvPlan(weight_bits, x.shape[1], kernel_size, alpha, bias, threshold, stride,
                    padding, dilation)(x)


def xnor_conv_reference(x: torch.Tensor, signs: torch.Tensor, alpha: torch.Tensor,
                        bias: torch.Tensor | None = None,
                        threshold: torch.Tensor | None = None,
                        stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                        dilation: int | Sequence[int] = 1) -> torch.Tensor:
    """Plain torch: convolution of ``binarize(x, threshold)`` (zero padding) with
    ``signs`` ``[O, C, *k]`` (+-1), times ``alpha`` ``[O]``, plus ``bias`` ``[O]``."""
    dims = signs.dim() - 2
    shape = (1, -1) + (1,) * dims
    t = None if threshold is None else threshold.float().reshape(shape)
    a = binarize(x.float(), t)
    conv = F.conv1d if dims == 1 else F.conv2d
    out = conv(a, signs.float(), None, stride, padding, dilation) * alpha.float().reshape(shape)
    return out + bias.float().reshape(shape) if bias is not None else out
