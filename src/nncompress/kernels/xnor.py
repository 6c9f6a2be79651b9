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

__all__ = ["available", "binarize", "kernel_status", "pack_activations", "pack_signs",
           "unavailable_reason", "words_for", "xnor_conv", "xnor_conv_reference",
           "xnor_linear", "xnor_linear_reference"]

_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES: dict[str, list[type]] = {
    "xnor_pack": [_P, _I, _I, _P, _P],
    "xnor_linear": [_P, _I, _I, _P, _P, _I, _P, _P, _P],
    "xnor_conv2d": [_P, _P, _P, _P, _I, _P, _P, _P],
}


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


def xnor_linear(x: torch.Tensor, weight_bits: torch.Tensor, in_features: int,
                alpha: torch.Tensor, bias: torch.Tensor | None = None,
                threshold: torch.Tensor | None = None) -> torch.Tensor:
    """Binary Linear in C: ``x`` ``[..., K]`` -> ``[..., N]`` float32.

    ``weight_bits`` ``[N, words]`` from :func:`pack_signs`, ``alpha`` / ``bias`` ``[N]``,
    ``threshold`` ``[K]`` or ``None``. Raises KernelUnavailableError without the kernel.
    """
    lib = _lib()
    lead = x.shape[:-1]
    flat = _float_input(x.reshape(-1, x.shape[-1]))
    n = weight_bits.shape[0]
    out = torch.empty(flat.shape[0], n, dtype=torch.float32)
    a = alpha.detach().float().contiguous()
    b = None if bias is None else bias.detach().float().contiguous()
    t = _threshold(threshold, in_features)
    _check(lib.xnor_linear(flat.data_ptr(), flat.shape[0], in_features, _ptr(t),
                           weight_bits.data_ptr(), n, a.data_ptr(), _ptr(b),
                           out.data_ptr()), "xnor_linear")
    return out.reshape(*lead, n)


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


def xnor_conv(x: torch.Tensor, weight_bits: torch.Tensor, kernel_size: Sequence[int],
              alpha: torch.Tensor, bias: torch.Tensor | None = None,
              threshold: torch.Tensor | None = None, stride: int | Sequence[int] = 1,
              padding: int | Sequence[int] = 0,
              dilation: int | Sequence[int] = 1) -> torch.Tensor:
    """Binary Conv1d (``x`` ``[B, C, L]``, ``kernel_size`` ``(k,)``) or Conv2d (``x``
    ``[B, C, H, W]``, ``(kh, kw)``) in C, groups 1, zero padding; ``weight_bits``
    ``[O, words]`` packed from the ``[O, C, *kernel_size]`` signs; ``threshold`` ``[C]``.
    Returns ``[B, O, *out_size]`` float32."""
    lib = _lib()
    dims = len(kernel_size)
    xin = _float_input(x)
    if dims == 1:
        xin = xin.unsqueeze(2)
    # a 1-D convolution is a 2-D one of height 1: kernel 1 x k, no padding in height
    kh, kw = (1, *kernel_size) if dims == 1 else kernel_size
    sh, sw = (1, *_pair(stride, 1)) if dims == 1 else _pair(stride, 2)
    ph, pw = (0, *_pair(padding, 1)) if dims == 1 else _pair(padding, 2)
    dh, dw = (1, *_pair(dilation, 1)) if dims == 1 else _pair(dilation, 2)
    b, c, h, wd = xin.shape
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    n = weight_bits.shape[0]
    out = torch.empty(b, n, max(ho, 0), max(wo, 0), dtype=torch.float32)
    if out.numel():
        geo = (ctypes.c_int64 * 14)(b, c, h, wd, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo)
        a = alpha.detach().float().contiguous()
        bb = None if bias is None else bias.detach().float().contiguous()
        t = _threshold(threshold, c)
        _check(lib.xnor_conv2d(xin.data_ptr(), geo, _ptr(t), weight_bits.data_ptr(), n,
                               a.data_ptr(), _ptr(bb), out.data_ptr()), "xnor_conv2d")
    return out.squeeze(2) if dims == 1 else out


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
