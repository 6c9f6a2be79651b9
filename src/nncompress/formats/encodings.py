"""Tensor encodings of the ``.nnc`` container, and the dtypes a container may hold.

An :class:`Encoding` turns one tensor into bytes plus a few integer ``params`` and back.
Adding one is one subclass here (or in its own module) plus one ``ENCODINGS.register``
line; the container, ``inspect`` and the default choice pick it up.

This module holds:

- ``dense``: the raw little-endian bytes of the tensor's own dtype (lossless);
- ``fp16``: float32 stored as IEEE half precision (lossy; only when asked for);
- ``sparse``: a bitmap of the non-zero elements plus their values (lossless), the storage
  that makes magnitude pruning (Han et al., "Learning both Weights and Connections for
  Efficient Neural Networks", 2015) pay off on disk.

``decode`` never trusts ``data`` or ``params``: both come from a file, and every mismatch
raises :class:`~nncompress.errors.FormatError`. Before any tensor is decoded the container
asks each encoding how many elements its bytes can honestly describe
(:meth:`Encoding.max_numel`), so a few bytes never decode into gigabytes; decoders
allocate memory proportional to their output.
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
from nncompress.formats._checks import MAX_ELEMENTS, check_int, fail
from nncompress.registry import Registry

__all__ = [
    "DTYPES",
    "ENCODINGS",
    "WORDS",
    "Buffer",
    "DType",
    "Dense",
    "Encoding",
    "Float16",
    "Sparse",
    "TensorStats",
    "array_to_tensor",
    "bytes_to_tensor",
    "dtype_info",
    "expect_params",
    "tensor_array",
    "tensor_buffer",
    "tensor_to_bytes",
]

#: Bytes-like data: ``encode`` returns ``bytes`` or a (zero-copy) ``memoryview``; ``decode``
#: also gets numpy byte arrays (slices of the container's read buffer).
Buffer = bytes | memoryview | np.ndarray
#: Unsigned integer "words" of each element size: the bit patterns packed encodings store.
WORDS = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}


@dataclass(frozen=True)
class DType:
    """One storable dtype: its header name and code, torch dtype and little-endian layout.

    ``code`` is its number in a version-2 tensor table. ``view`` is the same-sized integer
    dtype used to move the bits through numpy when numpy has no such dtype (bfloat16).
    """

    name: str
    code: int
    torch: torch.dtype
    storage: np.dtype
    view: torch.dtype | None = None

    @property
    def itemsize(self) -> int:
        return self.storage.itemsize


#: The dtype allowlist: header name -> DType. Nothing else is ever read from a file.
DTYPES: dict[str, DType] = {d.name: d for d in (
    DType("float64", 0, torch.float64, np.dtype("<f8")),
    DType("float32", 1, torch.float32, np.dtype("<f4")),
    DType("float16", 2, torch.float16, np.dtype("<f2")),
    DType("bfloat16", 3, torch.bfloat16, np.dtype("<i2"), view=torch.int16),
    DType("int64", 4, torch.int64, np.dtype("<i8")),
    DType("int32", 5, torch.int32, np.dtype("<i4")),
    DType("int16", 6, torch.int16, np.dtype("<i2")),
    DType("int8", 7, torch.int8, np.dtype("i1")),
    DType("uint8", 8, torch.uint8, np.dtype("u1")),
    DType("bool", 9, torch.bool, np.dtype("u1"), view=torch.uint8),
)}
_BY_TORCH = {d.torch: d for d in DTYPES.values()}


def dtype_info(dtype: torch.dtype | str) -> DType:
    """The :class:`DType` of a torch dtype or header name; others raise FormatError."""
    found = DTYPES.get(dtype) if isinstance(dtype, str) else _BY_TORCH.get(dtype)
    if found is None:
        fail(f"dtype {dtype} cannot be stored in a .nnc file; supported: {', '.join(DTYPES)}")
    return found


@dataclass(frozen=True)
class TensorStats:
    """Cheap facts about one tensor that bound each encoding's size (see ``choose.py``).

    ``distinct`` / ``distinct_nonzero``: numbers of distinct element bit patterns (all /
    non-zero ones); exact when ``exact``, else estimated from a sample. ``rows`` x ``cols``
    is the 2-D view CSR uses. ``entropy_bits`` / ``entropy_bits_nonzero``: the empirical
    entropy of the elements' (non-zero elements') values times their count -- no prefix
    code stores them in fewer bits (Shannon); 0.0 when not computed.
    """

    numel: int
    itemsize: int
    nonzero: int
    distinct: int
    distinct_nonzero: int
    rows: int
    cols: int
    exact: bool
    entropy_bits: float = 0.0
    entropy_bits_nonzero: float = 0.0


def tensor_array(tensor: torch.Tensor) -> np.ndarray:
    """The elements in C order as a 1-D numpy array of the dtype's little-endian storage
    (a view of the tensor's memory when it is contiguous and on the CPU)."""
    info = dtype_info(tensor.dtype)
    flat = tensor.detach().cpu().contiguous()
    if info.view is not None:
        flat = flat.view(info.view)
    return flat.numpy().reshape(-1).astype(info.storage, copy=False)


def tensor_buffer(tensor: torch.Tensor) -> memoryview:
    """:func:`tensor_array` as a flat byte view (no copy for a contiguous CPU tensor)."""
    return memoryview(tensor_array(tensor)).cast("B")


def tensor_to_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's elements in C order as little-endian bytes of its own dtype."""
    return tensor_array(tensor).tobytes()


def _owned(array: np.ndarray) -> np.ndarray:
    """``array`` if torch may share it (writable, aligned), else a copy."""
    if array.flags.writeable and array.flags.aligned and array.flags.c_contiguous:
        return array
    return array.copy()


def array_to_tensor(array: np.ndarray, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``dtype`` / ``shape`` sharing ``array`` (1-D, the dtype's storage layout
    or same-sized unsigned words) where possible; bools must be 0 or 1."""
    info = dtype_info(dtype)
    array = array.view(info.storage)
    if info.torch is torch.bool and array.size and int(array.max()) > 1:
        fail("a bool tensor holds a byte other than 0 or 1")
    if not info.storage.isnative:
        array = array.astype(info.storage.newbyteorder("="))
    out = torch.from_numpy(_owned(array).reshape(tuple(shape)))
    return out.view(info.torch) if info.view is not None else out


def bytes_to_tensor(data: Buffer | np.ndarray, shape: Sequence[int],
                    dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`tensor_to_bytes`; checks the length (and bools are 0 or 1).

    The result is independent of ``data``, except that a writable, aligned numpy byte
    array is adopted without a copy: the container hands decoders slices of the buffer
    it read the file into, so a dense tensor is read from disk and never copied again.
    """
    info = dtype_info(dtype)
    numel = math.prod(shape)
    if len(data) != numel * info.itemsize:
        fail(f"{len(data)} bytes cannot hold {numel} {info.name} elements")
    array = np.frombuffer(data, dtype=info.storage)
    return array_to_tensor(array if isinstance(data, np.ndarray) else array.copy(), shape,
                           dtype)


def expect_params(params: Any, encoding: str, keys: Sequence[str]) -> dict[str, Any]:
    """``params`` must be a dict with exactly ``keys`` (values are checked by the caller)."""
    if not isinstance(params, dict) or sorted(params) != sorted(keys):
        want = "{" + ", ".join(keys) + "}"
        fail(f"encoding {encoding!r} expects params with keys {want}, got {params!r}"[:200])
    return params


class Encoding(ABC):
    """One way to store a tensor. Subclasses set the class attributes and two methods.

    ``encode(tensor) -> (data, params)``: ``data`` is bytes-like (bytes or a memoryview);
    ``params`` maps each name of :attr:`param_keys` to a non-negative int (a version-2
    file stores them as varints in that order). ``decode(data, params, shape, dtype) ->
    tensor`` of exactly ``shape`` and ``dtype`` (the dtype recorded at encode time; lossy
    encodings decode back to it). :meth:`max_numel` and :meth:`min_size` make loading
    safe and the automatic choice fast.
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
    #: Its number (0..14) in a version-2 tensor table; None: the table spells its name.
    code: ClassVar[int | None] = None
    #: The keys of ``params``, in the order a version-2 tensor table stores them.
    param_keys: ClassVar[tuple[str, ...]] = ()

    @property
    def entropy_coded(self) -> bool:
        """Whether it Huffman-codes anything: the last Deep Compression stage."""
        return bool(self.coded_streams)

    def supports(self, dtype: torch.dtype) -> bool:
        """Whether tensors of ``dtype`` can be stored with this encoding."""
        info = _BY_TORCH.get(dtype)
        return info is not None and info.name in self.dtypes

    def max_numel(self, params: dict[str, Any], length: int, shape: Sequence[int],
                  itemsize: int, version: int) -> int:
        """The most elements ``length`` data bytes with ``params`` can honestly describe
        (for a file of format ``version``); the container refuses a tensor declaring more
        before decoding anything. The default bounds nothing."""
        return MAX_ELEMENTS

    def min_size(self, stats: TensorStats) -> int:
        """A lower bound of this encoding's data bytes for a tensor with ``stats`` (exact
        where it can be); the automatic choice skips an encoding that cannot win."""
        return 0

    @abstractmethod
    def encode(self, tensor: torch.Tensor) -> tuple[Buffer, dict[str, Any]]:
        """``tensor`` -> (bytes-like data, integer params)."""

    @abstractmethod
    def decode(self, data: Buffer, params: dict[str, Any], shape: Sequence[int],
               dtype: torch.dtype) -> torch.Tensor:
        """Bytes + params from a file -> tensor; hostile input raises FormatError."""

    def __repr__(self) -> str:
        return f"<encoding {self.name!r}>"


def int_param(params: dict[str, Any], key: str, encoding: str, *, lo: int = 0,
              hi: int = 2**62) -> int:
    """``params[key]`` as a checked int (a missing key is a FormatError too)."""
    if not isinstance(params, dict) or key not in params:
        fail(f"encoding {encoding!r} params lack {key!r}")
    return check_int(params[key], f"{encoding} {key}", lo=lo, hi=hi)


class Dense(Encoding):
    """Raw little-endian elements of the tensor's dtype, C order; ``params`` is ``{}``."""

    name = "dense"
    lossless = True
    code = 0

    def encode(self, tensor: torch.Tensor) -> tuple[Buffer, dict[str, Any]]:
        return tensor_buffer(tensor), {}

    def decode(self, data: Buffer, params: dict[str, Any], shape: Sequence[int],
               dtype: torch.dtype) -> torch.Tensor:
        expect_params(params, self.name, ())
        return bytes_to_tensor(data, shape, dtype)

    def max_numel(self, params: dict[str, Any], length: int, shape: Sequence[int],
                  itemsize: int, version: int) -> int:
        return length // itemsize

    def min_size(self, stats: TensorStats) -> int:
        return stats.numel * stats.itemsize


class Float16(Encoding):
    """float32 stored as IEEE 754 half precision (2 bytes per element), decoded to float32.

    Lossy: values round to 11 significant bits. Values beyond the float16 range
    (|x| > 65504) would become infinite, so encoding them raises FormatError.
    """

    name = "fp16"
    lossless = False
    dtypes = frozenset({"float32"})
    code = 1

    def encode(self, tensor: torch.Tensor) -> tuple[Buffer, dict[str, Any]]:
        half = tensor.detach().cpu().to(torch.float16)
        if bool((torch.isinf(half) & torch.isfinite(tensor.detach().cpu())).any()):
            raise FormatError("encoding 'fp16' cannot store values beyond +-65504 "
                              f"(tensor max |x| = {float(tensor.detach().abs().max()):g})")
        return tensor_buffer(half), {}

    def decode(self, data: Buffer, params: dict[str, Any], shape: Sequence[int],
               dtype: torch.dtype) -> torch.Tensor:
        expect_params(params, self.name, ())
        return bytes_to_tensor(data, shape, torch.float16).to(dtype)

    def max_numel(self, params: dict[str, Any], length: int, shape: Sequence[int],
                  itemsize: int, version: int) -> int:
        return length // 2


class Sparse(Encoding):
    """A bitmap of non-zero elements (1 bit each) followed by the non-zero values.

    Layout: ``ceil(numel / 8)`` bytes of ``np.packbits(mask, bitorder="little")`` (element
    ``i`` is bit ``i % 8`` of byte ``i // 8``; padding bits are 0), then the ``nnz``
    non-zero elements in C order as little-endian bytes of the tensor's dtype.
    ``params = {"nnz": int}``. "Non-zero" means any bit set, so ``-0.0`` is kept exactly.
    """

    name = "sparse"
    lossless = True
    code = 2
    param_keys = ("nnz",)

    def encode(self, tensor: torch.Tensor) -> tuple[Buffer, dict[str, Any]]:
        array = tensor_array(tensor)
        words = array.view(WORDS[array.itemsize])
        mask = words != 0
        bitmap = np.packbits(mask, bitorder="little").tobytes()
        return bitmap + words[mask].tobytes(), {"nnz": int(np.count_nonzero(mask))}

    def decode(self, data: Buffer, params: dict[str, Any], shape: Sequence[int],
               dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        nnz = check_int(expect_params(params, self.name, ("nnz",))["nnz"], "sparse nnz",
                        hi=numel)
        word = WORDS[dtype_info(dtype).itemsize]
        nbitmap = (numel + 7) // 8
        if len(data) != nbitmap + nnz * word.itemsize:
            fail(f"sparse data is {len(data)} bytes; {numel} elements with {nnz} non-zeros "
                 f"need {nbitmap + nnz * word.itemsize}")
        bitmap = np.frombuffer(data, dtype=np.uint8, count=nbitmap)
        if numel % 8 and int(bitmap[-1]) >> (numel % 8):
            fail("sparse bitmap has padding bits set")
        mask = np.unpackbits(bitmap, count=numel, bitorder="little").view(bool)
        if int(np.count_nonzero(mask)) != nnz:
            fail(f"sparse bitmap marks {int(np.count_nonzero(mask))} non-zeros but params "
                 f"say {nnz}")
        out = np.zeros(numel, dtype=word)
        out[mask] = np.frombuffer(data, dtype=word, offset=nbitmap)
        return array_to_tensor(out, shape, dtype)

    def max_numel(self, params: dict[str, Any], length: int, shape: Sequence[int],
                  itemsize: int, version: int) -> int:
        return 8 * length

    def min_size(self, stats: TensorStats) -> int:
        return (stats.numel + 7) // 8 + stats.nonzero * stats.itemsize


#: name -> Encoding instance. One registry line per encoding.
ENCODINGS: Registry[Encoding] = Registry("encoding", error=FormatError)
ENCODINGS.register(Dense.name, Dense())
ENCODINGS.register(Float16.name, Float16())
ENCODINGS.register(Sparse.name, Sparse())
