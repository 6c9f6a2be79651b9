"""Tensor encodings of the ``.nnc`` container, and the dtypes a container may hold.

An :class:`Encoding` turns one tensor into bytes plus a small JSON ``params`` dict and
back. Adding one is one subclass here (or in its own module) plus one
``ENCODINGS.register`` line; the container, ``inspect`` and the default choice pick it up.

This module holds:

- ``dense``: the raw little-endian bytes of the tensor's own dtype (lossless);
- ``fp16``: float32 stored as IEEE half precision (lossy; only when asked for);
- ``sparse``: a bitmap of the non-zero elements plus their values (lossless), the storage
  that makes magnitude pruning (Han et al., "Learning both Weights and Connections for
  Efficient Neural Networks", 2015) pay off on disk.

``decode`` never trusts ``data`` or ``params``: both come from a file, and every mismatch
raises :class:`~nncompress.errors.FormatError` before anything is allocated.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from nncompress.errors import FormatError
from nncompress.formats._checks import check_int, fail
from nncompress.registry import Registry

__all__ = [
    "DTYPES",
    "ENCODINGS",
    "DType",
    "Dense",
    "Encoding",
    "Float16",
    "Sparse",
    "bytes_to_tensor",
    "dtype_info",
    "expect_params",
    "tensor_to_bytes",
]


@dataclass(frozen=True)
class DType:
    """One storable dtype: its header name, torch dtype and little-endian storage layout.

    ``view`` is the same-sized integer dtype used to move the bits through numpy when
    numpy has no such dtype (bfloat16).
    """

    name: str
    torch: torch.dtype
    storage: np.dtype
    view: torch.dtype | None = None

    @property
    def itemsize(self) -> int:
        return self.storage.itemsize


#: The dtype allowlist: header name -> DType. Nothing else is ever read from a file.
DTYPES: dict[str, DType] = {d.name: d for d in (
    DType("float64", torch.float64, np.dtype("<f8")),
    DType("float32", torch.float32, np.dtype("<f4")),
    DType("float16", torch.float16, np.dtype("<f2")),
    DType("bfloat16", torch.bfloat16, np.dtype("<i2"), view=torch.int16),
    DType("int64", torch.int64, np.dtype("<i8")),
    DType("int32", torch.int32, np.dtype("<i4")),
    DType("int16", torch.int16, np.dtype("<i2")),
    DType("int8", torch.int8, np.dtype("i1")),
    DType("uint8", torch.uint8, np.dtype("u1")),
    DType("bool", torch.bool, np.dtype("u1"), view=torch.uint8),
)}
_BY_TORCH = {d.torch: d for d in DTYPES.values()}


def dtype_info(dtype: torch.dtype | str) -> DType:
    """The :class:`DType` of a torch dtype or header name; others raise FormatError."""
    found = DTYPES.get(dtype) if isinstance(dtype, str) else _BY_TORCH.get(dtype)
    if found is None:
        fail(f"dtype {dtype} cannot be stored in a .nnc file; supported: {', '.join(DTYPES)}")
    return found


def tensor_to_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's elements in C order as little-endian bytes of its own dtype."""
    info = dtype_info(tensor.dtype)
    flat = tensor.detach().cpu().contiguous()
    if info.view is not None:
        flat = flat.view(info.view)
    return flat.numpy().astype(info.storage, copy=False).tobytes()


def bytes_to_tensor(data: bytes | memoryview, shape: Sequence[int],
                    dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`tensor_to_bytes`; checks the length (and bools are 0 or 1)."""
    info = dtype_info(dtype)
    numel = math.prod(shape)
    if len(data) != numel * info.itemsize:
        fail(f"{len(data)} bytes cannot hold {numel} {info.name} elements")
    array = np.frombuffer(data, dtype=info.storage)
    if info.torch is torch.bool and array.size and int(array.max()) > 1:
        fail("a bool tensor holds a byte other than 0 or 1")
    native = array.astype(info.storage.newbyteorder("="), copy=True).reshape(tuple(shape))
    out = torch.from_numpy(native)
    return out.view(info.torch) if info.view is not None else out


def expect_params(params: Any, encoding: str, keys: Sequence[str]) -> dict[str, Any]:
    """``params`` must be a dict with exactly ``keys`` (values are checked by the caller)."""
    if not isinstance(params, dict) or sorted(params) != sorted(keys):
        want = "{" + ", ".join(keys) + "}"
        fail(f"encoding {encoding!r} expects params with keys {want}, got {params!r}"[:200])
    return params


class Encoding(ABC):
    """One way to store a tensor. Subclasses set the class attributes and two methods.

    ``encode(tensor) -> (data, params)``: ``params`` is JSON-able and holds what ``decode``
    needs besides the shape and dtype (which the container records).
    ``decode(data, params, shape, dtype) -> tensor`` of exactly ``shape`` and ``dtype``
    (the dtype recorded at encode time; lossy encodings decode back to it).
    """

    name: ClassVar[str]
    #: Decoding gives back bit-identical tensors.
    lossless: ClassVar[bool]
    #: Header names of the dtypes this encoding can store.
    dtypes: ClassVar[frozenset[str]] = frozenset(DTYPES)
    #: Considered by the default (smallest lossless) choice; expensive ones may opt out.
    auto: ClassVar[bool] = True
    #: The streams it entropy-codes (Huffman), named as in ``huffman.entropy_report``.
    coded_streams: ClassVar[tuple[str, ...]] = ()

    @property
    def entropy_coded(self) -> bool:
        """Whether it Huffman-codes anything: the last Deep Compression stage."""
        return bool(self.coded_streams)

    def supports(self, dtype: torch.dtype) -> bool:
        """Whether tensors of ``dtype`` can be stored with this encoding."""
        info = _BY_TORCH.get(dtype)
        return info is not None and info.name in self.dtypes

    @abstractmethod
    def encode(self, tensor: torch.Tensor) -> tuple[bytes, dict[str, Any]]:
        """``tensor`` -> (bytes, JSON-able params)."""

    @abstractmethod
    def decode(self, data: bytes | memoryview, params: dict[str, Any], shape: Sequence[int],
               dtype: torch.dtype) -> torch.Tensor:
        """Bytes + params from a file -> tensor; hostile input raises FormatError."""

    def __repr__(self) -> str:
        return f"<encoding {self.name!r}>"


class Dense(Encoding):
    """Raw little-endian elements of the tensor's dtype, C order; ``params`` is ``{}``."""

    name = "dense"
    lossless = True

    def encode(self, tensor: torch.Tensor) -> tuple[bytes, dict[str, Any]]:
        return tensor_to_bytes(tensor), {}

    def decode(self, data: bytes | memoryview, params: dict[str, Any], shape: Sequence[int],
               dtype: torch.dtype) -> torch.Tensor:
        expect_params(params, self.name, ())
        return bytes_to_tensor(data, shape, dtype)


class Float16(Encoding):
    """float32 stored as IEEE 754 half precision (2 bytes per element), decoded to float32.

    Lossy: values round to 11 significant bits. Values beyond the float16 range
    (|x| > 65504) would become infinite, so encoding them raises FormatError.
    """

    name = "fp16"
    lossless = False
    dtypes = frozenset({"float32"})

    def encode(self, tensor: torch.Tensor) -> tuple[bytes, dict[str, Any]]:
        half = tensor.detach().cpu().to(torch.float16)
        if bool((torch.isinf(half) & torch.isfinite(tensor.detach().cpu())).any()):
            raise FormatError("encoding 'fp16' cannot store values beyond +-65504 "
                              f"(tensor max |x| = {float(tensor.detach().abs().max()):g})")
        return tensor_to_bytes(half), {}

    def decode(self, data: bytes | memoryview, params: dict[str, Any], shape: Sequence[int],
               dtype: torch.dtype) -> torch.Tensor:
        expect_params(params, self.name, ())
        return bytes_to_tensor(data, shape, torch.float16).to(dtype)


class Sparse(Encoding):
    """A bitmap of non-zero elements (1 bit each) followed by the non-zero values.

    Layout: ``ceil(numel / 8)`` bytes of ``np.packbits(mask, bitorder="little")`` (element
    ``i`` is bit ``i % 8`` of byte ``i // 8``; padding bits are 0), then the ``nnz``
    non-zero elements in C order as little-endian bytes of the tensor's dtype.
    ``params = {"nnz": int}``. "Non-zero" means any bit set, so ``-0.0`` is kept exactly.
    """

    name = "sparse"
    lossless = True

    def encode(self, tensor: torch.Tensor) -> tuple[bytes, dict[str, Any]]:
        itemsize = dtype_info(tensor.dtype).itemsize
        rows = np.frombuffer(tensor_to_bytes(tensor), dtype=np.uint8).reshape(-1, itemsize)
        mask = rows.any(axis=1)
        bitmap = np.packbits(mask, bitorder="little").tobytes()
        return bitmap + rows[mask].tobytes(), {"nnz": int(mask.sum())}

    def decode(self, data: bytes | memoryview, params: dict[str, Any], shape: Sequence[int],
               dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        nnz = check_int(expect_params(params, self.name, ("nnz",))["nnz"], "sparse nnz",
                        hi=numel)
        itemsize = dtype_info(dtype).itemsize
        nbitmap = (numel + 7) // 8
        if len(data) != nbitmap + nnz * itemsize:
            fail(f"sparse data is {len(data)} bytes; {numel} elements with {nnz} non-zeros "
                 f"need {nbitmap + nnz * itemsize}")
        bits = np.unpackbits(np.frombuffer(data[:nbitmap], dtype=np.uint8), bitorder="little")
        if bits[numel:].any():
            fail("sparse bitmap has padding bits set")
        mask = bits[:numel].astype(bool)
        if int(mask.sum()) != nnz:
            fail(f"sparse bitmap marks {int(mask.sum())} non-zeros but params say {nnz}")
        rows = np.zeros((numel, itemsize), dtype=np.uint8)
        rows[mask] = np.frombuffer(data[nbitmap:], dtype=np.uint8).reshape(nnz, itemsize)
        return bytes_to_tensor(rows.tobytes(), shape, dtype)


#: name -> Encoding instance. One registry line per encoding.
ENCODINGS: Registry[Encoding] = Registry("encoding", error=FormatError)
ENCODINGS.register(Dense.name, Dense())
ENCODINGS.register(Float16.name, Float16())
ENCODINGS.register(Sparse.name, Sparse())
