"""Bit-packed lossless encodings: ``codebook``, ``sparse_rel`` and ``csr``.

The storage formats of Deep Compression (Han, Mao & Dally, "Deep Compression: Compressing
Deep Neural Networks with Pruning, Trained Quantization and Huffman Coding", 2015):

- ``codebook``: the tensor's distinct values (a weight-shared tensor has few) plus one
  bit-packed index per element;
- ``sparse_rel``: the non-zeros in C order as (relative index, value) pairs, the index
  difference stored in ``index_bits`` bits, with filler zero entries when a gap overflows;
- ``csr``: compressed sparse rows of the tensor viewed as ``[shape[0], numel / shape[0]]``
  (a conv weight ``[out, in, k]`` becomes ``[out, in * k]``).

All work on the bit patterns of the elements (viewed as unsigned integers of the dtype's
size), so they are lossless for every dtype, ``-0.0`` and NaN payloads included; an
element is "non-zero" when any of its bits is set. Bit packing is little-endian: value
``i`` of width ``b`` occupies stream bits ``[i*b, (i+1)*b)``, least significant first, and
stream bit ``j`` is bit ``j % 8`` of byte ``j // 8``; padding bits are 0 (``bits.py``).
Byte layouts and params are in ``docs/FORMAT.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from nncompress.formats._checks import check_int, fail
from nncompress.formats.bits import (
    INDEX_BITS,
    MAX_BITS,
    bits_for,
    min_entries,
    pack_bits,
    packed_size,
    relative_bound,
    relative_diffs,
    relative_positions,
    uint_dtype,
    unpack_bits,
    zero_gaps,
)
from nncompress.formats.encodings import (
    ENCODINGS,
    WORDS,
    Buffer,
    Encoding,
    TensorStats,
    array_to_tensor,
    dtype_info,
    expect_params,
    int_param,
    tensor_array,
)

__all__ = [
    "CSR",
    "INDEX_BITS",
    "MAX_BITS",
    "Codebook",
    "SparseRel",
    "bits_for",
    "build_codebook",
    "element_words",
    "pack_bits",
    "relative_diffs",
    "relative_positions",
    "unpack_bits",
    "values_bytes",
    "words_to_tensor",
]

KEYS_WIDTH = ("ptr_bytes", "col_bytes")
_WORD = WORDS
#: Elements sampled to guess whether a large tensor has few distinct values.
_SAMPLE = 1 << 14


def element_words(tensor: torch.Tensor) -> np.ndarray:
    """The elements in C order as unsigned integers of the dtype's size (bit patterns)."""
    array = tensor_array(tensor)
    return array.view(WORDS[array.itemsize])


def words_to_tensor(words: np.ndarray, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`element_words` (a bool holding a byte other than 0/1 is refused)."""
    word = WORDS[dtype_info(dtype).itemsize]
    return array_to_tensor(np.ascontiguousarray(words, dtype=word), shape, dtype)


def build_codebook(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct words sorted ascending, index of each element into them).

    A large tensor with few distinct words (a weight-shared one) is indexed against the
    distinct words of a sample, which avoids sorting it all; the result is the same.
    """
    words = words.reshape(-1)
    if words.size > 1 << 16:
        book = np.unique(words[::words.size // _SAMPLE + 1])
        if book.size <= _SAMPLE // 16:
            found = np.searchsorted(book, words)
            np.minimum(found, book.size - 1, out=found)
            if np.array_equal(book[found], words):
                return book, found.astype(uint_dtype(bits_for(book.size)))
    codebook, indices = np.unique(words, return_inverse=True)
    return codebook, indices.reshape(-1).astype(uint_dtype(bits_for(codebook.size)))


def read_codebook(data: Buffer, codes: int, word: np.dtype) -> np.ndarray:
    """``codes`` distinct words, strictly ascending (as :func:`build_codebook` writes them)."""
    if len(data) != codes * word.itemsize:
        fail(f"codebook is {len(data)} bytes; {codes} codes need {codes * word.itemsize}")
    book = np.frombuffer(data, dtype=word)
    if codes > 1 and not bool(np.all(book[1:] > book[:-1])):
        fail("codebook entries are not strictly ascending")
    return book


def split(data: Buffer, sizes: Sequence[int], what: str) -> list[memoryview]:
    """Cut ``data`` into consecutive sections of ``sizes`` bytes; the total must match."""
    if len(data) != sum(sizes):
        fail(f"{what} data is {len(data)} bytes; its sections need {sum(sizes)}")
    view, out, start = memoryview(data), [], 0
    for size in sizes:
        out.append(view[start:start + size])
        start += size
    return out


def values_bytes(count: int, codes: int, itemsize: int) -> int:
    """Bytes of the values section for ``count`` values with ``codes`` distinct ones: the
    smaller of raw words and codebook + packed indices (raw on ties, and when empty)."""
    raw = count * itemsize
    book = codes * itemsize + packed_size(count, bits_for(codes))
    return raw if not count or raw <= book else book


def values_size(words: np.ndarray) -> tuple[int, int]:
    """(raw bytes, codebook bytes) of storing ``words`` (the value section choice)."""
    codes = int(np.unique(words).size)
    raw = words.size * words.dtype.itemsize
    return raw, codes * words.dtype.itemsize + packed_size(words.size, bits_for(codes))


def encode_values(words: np.ndarray) -> tuple[bytes, int, int]:
    """``words`` raw (codes = value_bits = 0) or as codebook + packed indices, the smaller.

    Returns ``(bytes, codes, value_bits)``.
    """
    raw, book = values_size(words)
    if not words.size or raw <= book:
        return words.tobytes(), 0, 0
    codebook, indices = build_codebook(words)
    bits = bits_for(codebook.size)
    return codebook.tobytes() + pack_bits(indices, bits), int(codebook.size), bits


def decode_values(data: Buffer, codes: int, value_bits: int, count: int,
                  word: np.dtype, what: str) -> np.ndarray:
    """Inverse of :func:`encode_values` for ``count`` values of ``word``."""
    if codes == 0:
        if value_bits != 0:
            fail(f"{what} raw values must have value_bits 0, got {value_bits}")
        if len(data) != count * word.itemsize:
            fail(f"{what} values are {len(data)} bytes; {count} need {count * word.itemsize}")
        return np.frombuffer(data, dtype=word)
    if value_bits != bits_for(codes):
        fail(f"{what} value_bits {value_bits} does not fit {codes} codes")
    book_bytes, packed = split(data, [codes * word.itemsize, packed_size(count, value_bits)],
                               f"{what} values")
    book = read_codebook(book_bytes, codes, word)
    indices = unpack_bits(packed, value_bits, count, f"{what} value indices")
    if indices.size and int(indices.max()) >= codes:
        fail(f"{what} value index {int(indices.max())} is outside the {codes}-entry codebook")
    return book[indices]


def value_params(params: dict[str, Any], count: int, what: str) -> tuple[int, int]:
    codes = check_int(params["codes"], f"{what} codes", hi=count)
    return codes, check_int(params["value_bits"], f"{what} value_bits", hi=MAX_BITS)


class Codebook(Encoding):
    """Distinct values + bit-packed indices (weight sharing, Han et al. 2015).

    Layout: ``codes`` distinct elements (bit patterns, strictly ascending, little-endian of
    the tensor's dtype), then ``numel`` indices of ``bits = max(1, ceil(log2 codes))`` bits
    each, bit-packed. ``params = {"codes": k, "bits": b}``. Any number of distinct values
    is stored exactly; it pays off when there are few (a 16-value tensor takes 4 bits an
    element).
    """

    name = "codebook"
    lossless = True
    code = 3
    param_keys = ("codes", "bits")

    def encode(self, tensor: torch.Tensor) -> tuple[Buffer, dict[str, Any]]:
        codebook, indices = build_codebook(element_words(tensor))
        bits = bits_for(codebook.size)
        return (codebook.tobytes() + pack_bits(indices, bits),
                {"codes": int(codebook.size), "bits": bits})

    def decode(self, data: Buffer, params: dict[str, Any], shape: Sequence[int],
               dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        expect_params(params, self.name, self.param_keys)
        codes = check_int(params["codes"], "codebook codes", lo=min(numel, 1), hi=numel)
        bits = check_int(params["bits"], "codebook bits", lo=1, hi=MAX_BITS)
        if bits != bits_for(codes):
            fail(f"codebook bits {bits} does not match {codes} codes")
        word = _WORD[dtype_info(dtype).itemsize]
        book_bytes, packed = split(data, [codes * word.itemsize, packed_size(numel, bits)],
                                   "codebook")
        book = read_codebook(book_bytes, codes, word)
        indices = unpack_bits(packed, bits, numel, "codebook indices")
        if indices.size and int(indices.max()) >= codes:
            fail(f"codebook index {int(indices.max())} is outside the {codes}-entry codebook")
        return words_to_tensor(book[indices], shape, dtype)

    def max_numel(self, params: dict[str, Any], length: int, shape: Sequence[int],
                  itemsize: int, version: int) -> int:
        return 8 * length  # every index takes at least one bit

    def min_size(self, stats: TensorStats) -> int:
        if not stats.numel:
            return 0
        return (stats.distinct * stats.itemsize
                + packed_size(stats.numel, bits_for(stats.distinct)))


def best_index_bits(positions: np.ndarray, value_bytes: float, numel: int) -> int:
    """The ``sparse_rel`` index width in :data:`INDEX_BITS` giving the fewest bytes.

    ``value_bytes`` is the (estimated) cost of one stored value.
    """
    gaps = zero_gaps(positions, numel)
    costs = [(positions.size + int((gaps >> b).sum())) * (b / 8 + value_bytes)
             for b in INDEX_BITS]
    return INDEX_BITS[int(np.argmin(costs))]


class SparseRel(Encoding):
    """Non-zeros as (relative index, value) entries (Han, Mao & Dally 2015, Deep Compression).

    Layout: ``entries`` index differences of ``index_bits`` bits, bit-packed (each is the
    count of zeros skipped since the previous entry; a gap over ``2**index_bits - 1`` gets
    filler entries of value zero, and so does a trailing run of zeros), then the
    ``entries`` values: raw elements of the dtype (``codes = value_bits = 0``) or
    ``codes`` distinct elements (ascending) + indices of ``value_bits`` bits, bit-packed.
    ``params = {"entries", "index_bits", "codes", "value_bits"}``.
    """

    name = "sparse_rel"
    lossless = True
    code = 4
    KEYS = ("entries", "index_bits", "codes", "value_bits")
    param_keys = KEYS

    def encode(self, tensor: torch.Tensor,
               index_bits: int | None = None) -> tuple[Buffer, dict[str, Any]]:
        """``index_bits`` (1..32) forces the index width; by default the smallest wins."""
        words = element_words(tensor)
        positions = np.flatnonzero(words)
        if index_bits is None:
            value_bytes = min(values_size(words[positions])) / max(positions.size, 1)
            index_bits = best_index_bits(positions, value_bytes, words.size)
        diffs, real = relative_diffs(positions, index_bits, words.size)
        entry_words = np.zeros(diffs.size, dtype=words.dtype)
        entry_words[real] = words[positions]
        values, codes, value_bits = encode_values(entry_words)
        params = {"entries": int(diffs.size), "index_bits": index_bits, "codes": codes,
                  "value_bits": value_bits}
        return pack_bits(diffs, index_bits) + values, params

    def decode(self, data: Buffer, params: dict[str, Any], shape: Sequence[int],
               dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        expect_params(params, self.name, self.KEYS)
        entries = check_int(params["entries"], "sparse_rel entries", hi=numel)
        index_bits = check_int(params["index_bits"], "sparse_rel index_bits", lo=1,
                               hi=MAX_BITS)
        codes, value_bits = value_params(params, entries, "sparse_rel")
        word = _WORD[dtype_info(dtype).itemsize]
        index_size = packed_size(entries, index_bits)
        if len(data) < index_size:
            fail(f"sparse_rel data is {len(data)} bytes; its indices alone need {index_size}")
        view = memoryview(data)
        diffs = unpack_bits(view[:index_size], index_bits, entries, "sparse_rel indices")
        positions = relative_positions(diffs, numel, "sparse_rel index")
        values = decode_values(view[index_size:], codes, value_bits, entries, word,
                               "sparse_rel")
        out = np.zeros(numel, dtype=word)
        out[positions] = values
        return words_to_tensor(out, shape, dtype)

    def max_numel(self, params: dict[str, Any], length: int, shape: Sequence[int],
                  itemsize: int, version: int) -> int:
        entries = int_param(params, "entries", self.name)
        bits = int_param(params, "index_bits", self.name, lo=1, hi=MAX_BITS)
        return super().max_numel(params, length, shape, itemsize, version) if version < 2 \
            else relative_bound(entries, bits, length)

    def min_size(self, stats: TensorStats) -> int:
        entries = min_entries(stats)
        codes = max(stats.distinct_nonzero, 1)
        return packed_size(entries, 1) + values_bytes(entries, codes, stats.itemsize)


def csr_view(shape: Sequence[int]) -> tuple[int, int]:
    """(rows, cols) of the 2-D view CSR uses: ``[shape[0], rest]``, or one row if < 2-D."""
    numel = math.prod(shape)
    rows = shape[0] if len(shape) >= 2 else 1
    return rows, (numel // rows if rows else 0)


def uint_bytes(limit: int) -> int:
    """Smallest of 1, 2, 4, 8 bytes whose unsigned range holds ``limit``."""
    return next(n for n in (1, 2, 4, 8) if limit < 1 << (8 * n))


class CSR(Encoding):
    """Compressed sparse rows of the tensor viewed as ``[rows, cols]`` (see :func:`csr_view`).

    Layout: ``rows + 1`` row pointers (unsigned, ``ptr_bytes`` each, little-endian; first
    0, non-decreasing, last ``nnz``), ``nnz`` column indices (unsigned, ``col_bytes``
    each; strictly increasing within a row), then the ``nnz`` values: raw or codebook +
    packed indices exactly as in ``sparse_rel``. ``params = {"nnz", "ptr_bytes",
    "col_bytes", "codes", "value_bits"}``; widths are the smallest of 1/2/4/8 that fit.
    """

    name = "csr"
    lossless = True
    code = 5
    KEYS = ("nnz", "ptr_bytes", "col_bytes", "codes", "value_bits")
    param_keys = KEYS

    def encode(self, tensor: torch.Tensor) -> tuple[Buffer, dict[str, Any]]:
        words = element_words(tensor)
        rows, cols = csr_view(tuple(tensor.shape))
        positions = np.flatnonzero(words)
        row_ptr = np.searchsorted(positions, np.arange(rows + 1) * cols)
        ptr_bytes, col_bytes = uint_bytes(positions.size), uint_bytes(max(cols - 1, 0))
        values, codes, value_bits = encode_values(words[positions])
        data = (row_ptr.astype(_WORD[ptr_bytes]).tobytes()
                + (positions % max(cols, 1)).astype(_WORD[col_bytes]).tobytes() + values)
        return data, {"nnz": int(positions.size), "ptr_bytes": ptr_bytes,
                      "col_bytes": col_bytes, "codes": codes, "value_bits": value_bits}

    def decode(self, data: Buffer, params: dict[str, Any], shape: Sequence[int],
               dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        rows, cols = csr_view(shape)
        expect_params(params, self.name, self.KEYS)
        nnz = check_int(params["nnz"], "csr nnz", hi=numel)
        widths = [check_int(params[k], f"csr {k}", lo=1, hi=8) for k in KEYS_WIDTH]
        if any(w not in _WORD for w in widths):
            fail(f"csr index widths must be 1, 2, 4 or 8 bytes, got {widths}")
        codes, value_bits = value_params(params, nnz, "csr")
        word = _WORD[dtype_info(dtype).itemsize]
        head = [(rows + 1) * widths[0], nnz * widths[1]]
        if len(data) < sum(head):
            fail(f"csr data is {len(data)} bytes; its row pointers and columns need {sum(head)}")
        view = memoryview(data)
        ptr = np.frombuffer(view[:head[0]], dtype=_WORD[widths[0]]).astype(np.int64)
        col = np.frombuffer(view[head[0]:sum(head)], dtype=_WORD[widths[1]]).astype(np.int64)
        if ptr[0] != 0 or ptr[-1] != nnz or bool(np.any(np.diff(ptr) < 0)):
            fail(f"csr row pointers are not non-decreasing from 0 to nnz {nnz}")
        if col.size and int(col.max()) >= cols:
            fail(f"csr column index {int(col.max())} is outside the {cols} columns")
        positions = np.repeat(np.arange(rows, dtype=np.int64), np.diff(ptr)) * cols + col
        if bool(np.any(np.diff(positions) <= 0)):
            fail("csr column indices are not strictly increasing within a row")
        values = decode_values(view[sum(head):], codes, value_bits, nnz, word, "csr")
        out = np.zeros(numel, dtype=word)
        out[positions] = values
        return words_to_tensor(out, shape, dtype)

    def max_numel(self, params: dict[str, Any], length: int, shape: Sequence[int],
                  itemsize: int, version: int) -> int:
        """Rows cost ``ptr_bytes`` each; columns are bounded by the width of a column
        index only (a row of zeros costs nothing), so the cap on allocation does the rest."""
        ptr_bytes = int_param(params, "ptr_bytes", self.name, lo=1, hi=8)
        col_bytes = int_param(params, "col_bytes", self.name, lo=1, hi=8)
        rows, cols = csr_view(shape)
        if rows + 1 > length // ptr_bytes or cols > 1 << (8 * col_bytes):
            return 0
        return math.prod(shape)

    def min_size(self, stats: TensorStats) -> int:
        return ((stats.rows + 1) * uint_bytes(stats.nonzero)
                + stats.nonzero * uint_bytes(max(stats.cols - 1, 0))
                + values_bytes(stats.nonzero, stats.distinct_nonzero, stats.itemsize))


ENCODINGS.register(Codebook.name, Codebook())
ENCODINGS.register(SparseRel.name, SparseRel())
ENCODINGS.register(CSR.name, CSR())
