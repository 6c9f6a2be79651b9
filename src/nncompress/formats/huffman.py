"""Canonical Huffman coding of quantized weights and sparse indices (lossless encodings).

The last stage of Deep Compression (Han, Mao & Dally, "Deep Compression: Compressing Deep
Neural Networks with Pruning, Trained Quantization and Huffman Coding", 2015): the
codebook indices of a weight-shared tensor and the relative indices of a pruned one are
skewed, so a Huffman code (Huffman, 1952) stores them in close to their entropy.

- ``codebook_huffman``: ``codebook`` with the per-element indices Huffman coded;
- ``sparse_rel_huffman``: ``sparse_rel`` with the relative indices Huffman coded, and
  the values too when they are stored as codebook indices.

The code is canonical, so a code table is just the code length of each symbol (5 bits
each, 0 = unused, at most :data:`MAX_LENGTH`). Codes are written most significant bit
first into a big-endian bit stream (``np.packbits`` default order), padded with 0 bits.
Each encoding stores a CRC-32 of its data in ``params``, so a flipped bit is reported as
such; decoding also checks the table (Kraft equality), symbol counts and padding. The
codes themselves are in :mod:`~nncompress.formats.prefix_code`, their vectorised decoding
in :mod:`~nncompress.formats.prefix_decode`. :func:`entropy_report` says how close each
stream comes to its empirical entropy.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nncompress.formats._checks import check_int, fail
from nncompress.formats.bits import (
    INDEX_BITS,
    min_entries,
    pack_bits,
    packed_size,
    relative_bound,
    relative_diffs,
    relative_positions,
    unpack_bits,
)
from nncompress.formats.encodings import (
    ENCODINGS,
    WORDS,
    Buffer,
    Encoding,
    TensorStats,
    dtype_info,
    expect_params,
    int_param,
)
from nncompress.formats.packed import (
    build_codebook,
    element_words,
    read_codebook,
    split,
    words_to_tensor,
)
from nncompress.formats.prefix_code import (
    LENGTH_BITS,
    MAX_LENGTH,
    check_lengths,
    code_lengths,
    huffman_encode,
)
from nncompress.formats.prefix_decode import huffman_decode

__all__ = [
    "MAX_LENGTH",
    "CodebookHuffman",
    "EntropyReport",
    "SparseRelHuffman",
    "StreamEntropy",
    "check_lengths",
    "code_lengths",
    "entropy_report",
    "huffman_decode",
    "huffman_encode",
]

#: Above this many relative indices the index width is chosen from the entropy of each
#: width's index histogram rather than from its exact Huffman code (a tree per width).
EXACT_WIDTH_CHOICE = 1 << 16


def pack_table(lengths: np.ndarray) -> bytes:
    return pack_bits(lengths.astype(np.uint64), LENGTH_BITS)


def read_table(data: Buffer, size: int, what: str) -> np.ndarray:
    return unpack_bits(data, LENGTH_BITS, size, f"{what} code table").astype(np.int64)


def table_size(size: int) -> int:
    return (size * LENGTH_BITS + 7) // 8


def _coded(symbols: np.ndarray, alphabet: int) -> tuple[bytes, bytes]:
    """(code table, stream) of ``symbols`` in ``range(alphabet)``."""
    counts = np.bincount(symbols.astype(np.int64), minlength=alphabet)
    lengths = code_lengths(counts)
    return pack_table(lengths), huffman_encode(symbols, lengths)


def _check_crc(data: Buffer, crc: Any, what: str) -> None:
    expected = check_int(crc, f"{what} crc32", hi=2**32 - 1)
    if zlib.crc32(data) != expected:
        fail(f"{what} data fails its CRC-32 check: corrupted or truncated")


def _decode_symbols(table: Buffer, stream: Buffer, alphabet: int, count: int,
                    what: str) -> np.ndarray:
    return huffman_decode(stream, read_table(table, alphabet, what), count, what)


class CodebookHuffman(Encoding):
    """``codebook`` with Huffman-coded indices (Han, Mao & Dally 2015; Huffman 1952).

    Layout: ``codes`` distinct elements (ascending bit patterns, little-endian), the code
    table (``codes`` lengths of 5 bits, bit-packed little-endian), then the canonical
    Huffman stream of the ``numel`` indices (MSB first, zero-padded to a byte).
    ``params = {"codes": k, "crc32": CRC-32 of the data}``.
    """

    name = "codebook_huffman"
    lossless = True
    coded_streams = ("weights",)
    code = 6
    param_keys = ("codes", "crc32")

    def encode(self, tensor: torch.Tensor) -> tuple[Buffer, dict[str, Any]]:
        codebook, indices = build_codebook(element_words(tensor))
        table, stream = _coded(indices, codebook.size)
        data = codebook.tobytes() + table + stream
        return data, {"codes": int(codebook.size), "crc32": zlib.crc32(data)}

    def decode(self, data: Buffer, params: dict[str, Any], shape: Sequence[int],
               dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        expect_params(params, self.name, self.param_keys)
        codes = check_int(params["codes"], "codebook_huffman codes", lo=min(numel, 1),
                          hi=numel)
        _check_crc(data, params["crc32"], self.name)
        word = WORDS[dtype_info(dtype).itemsize]
        head = [codes * word.itemsize, table_size(codes)]
        if len(data) < sum(head):
            fail(f"codebook_huffman data is {len(data)} bytes; its tables need {sum(head)}")
        book_bytes, table, stream = split(data, [*head, len(data) - sum(head)], self.name)
        book = read_codebook(book_bytes, codes, word)
        indices = _decode_symbols(table, stream, codes, numel, self.name)
        return words_to_tensor(book[indices], shape, dtype)

    def max_numel(self, params: dict[str, Any], length: int, shape: Sequence[int],
                  itemsize: int, version: int) -> int:
        return 8 * length  # every code takes at least one bit

    def min_size(self, stats: TensorStats) -> int:
        if not stats.numel:
            return 0
        stream = max(stats.numel, math.ceil(stats.entropy_bits))  # >= 1 bit a code
        return stats.distinct * stats.itemsize + table_size(stats.distinct) + (stream + 7) // 8


def _entropy(counts: np.ndarray) -> float:
    """Empirical entropy in bits per symbol of a histogram."""
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return max(0.0, float(-(p * np.log2(p)).sum()))


def _value_bits(values: np.ndarray) -> float:
    """Estimated bits of one stored value: its entropy if coded, else the raw width."""
    counts = np.unique(values, return_counts=True)[1]
    return min(_entropy(counts) + 0.1, 8.0 * values.dtype.itemsize)


def _coded_bits(counts: np.ndarray, exact: bool) -> float:
    """Bits of a stream with symbol ``counts``: its Huffman code's, or the entropy's."""
    if exact:
        return float((counts * code_lengths(counts)).sum())
    return _entropy(counts) * float(counts.sum())


def best_huffman_index_bits(positions: np.ndarray, value_bits: float, numel: int) -> int:
    """The index width whose Huffman-coded relative indices + table are smallest.

    Each entry (filler or not) also costs one value of about ``value_bits`` bits.
    """
    exact = positions.size <= EXACT_WIDTH_CHOICE
    costs = []
    for bits in INDEX_BITS:
        diffs, _ = relative_diffs(positions, bits, numel)
        counts = np.bincount(diffs.astype(np.int64), minlength=1 << bits)
        coded = _coded_bits(counts, exact)
        costs.append((coded + diffs.size * value_bits) / 8 + table_size(1 << bits))
    return INDEX_BITS[int(np.argmin(costs))]


def _entries(tensor: torch.Tensor, index_bits: int | None
             ) -> tuple[np.ndarray, np.ndarray, int]:
    """(relative indices, their values, index_bits) of ``tensor`` as sparse_rel_huffman
    stores it (the width chosen when ``index_bits`` is None)."""
    words = element_words(tensor)
    positions = np.flatnonzero(words)
    if index_bits is None:
        index_bits = best_huffman_index_bits(positions, _value_bits(words[positions]),
                                             words.size)
    diffs, real = relative_diffs(positions, index_bits, words.size)
    entry_words = np.zeros(diffs.size, dtype=words.dtype)
    entry_words[real] = words[positions]
    return diffs, entry_words, index_bits


class SparseRelHuffman(Encoding):
    """``sparse_rel`` with Huffman-coded relative indices and values (Han et al. 2015).

    Layout: ``codes`` distinct values (ascending bit patterns; none when ``codes`` is 0),
    the index code table (``2**index_bits`` lengths of 5 bits), the value code table
    (``codes`` lengths), the Huffman stream of the ``entries`` relative indices
    (``index_bytes`` bytes), then the values: the Huffman stream of their codebook indices,
    or (``codes == 0``) the raw elements. Relative indices and filler entries are as in
    ``sparse_rel``. ``params = {"entries", "index_bits", "codes", "index_bytes", "crc32"}``.
    """

    name = "sparse_rel_huffman"
    lossless = True
    coded_streams = ("indices", "values")
    code = 7
    KEYS = ("entries", "index_bits", "codes", "index_bytes", "crc32")
    param_keys = KEYS

    def encode(self, tensor: torch.Tensor,
               index_bits: int | None = None) -> tuple[Buffer, dict[str, Any]]:
        """``index_bits`` (1..16) forces the index width; by default the smallest wins."""
        diffs, entry_words, index_bits = _entries(tensor, index_bits)
        index_table, index_stream = _coded(diffs, 1 << index_bits)
        book = np.zeros(0, dtype=entry_words.dtype)
        value_table, values = b"", entry_words.tobytes()
        codebook, indices = build_codebook(entry_words)
        if codebook.size * entry_words.itemsize < len(values):
            table, stream = _coded(indices, codebook.size)
            if len(table) + len(stream) + codebook.size * entry_words.itemsize < len(values):
                book, value_table, values = codebook, table, stream
        data = book.tobytes() + index_table + value_table + index_stream + values
        return data, {"entries": int(diffs.size), "index_bits": index_bits,
                      "codes": int(book.size), "index_bytes": len(index_stream),
                      "crc32": zlib.crc32(data)}

    def decode(self, data: Buffer, params: dict[str, Any], shape: Sequence[int],
               dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        expect_params(params, self.name, self.KEYS)
        what = self.name
        entries = check_int(params["entries"], f"{what} entries", hi=numel)
        index_bits = check_int(params["index_bits"], f"{what} index_bits", lo=1, hi=16)
        codes = check_int(params["codes"], f"{what} codes", hi=entries)
        index_bytes = check_int(params["index_bytes"], f"{what} index_bytes", hi=len(data))
        _check_crc(data, params["crc32"], what)
        word = WORDS[dtype_info(dtype).itemsize]
        head = [codes * word.itemsize, table_size(1 << index_bits), table_size(codes),
                index_bytes]
        if len(data) < sum(head):
            fail(f"{what} data is {len(data)} bytes; its tables and indices need {sum(head)}")
        book_bytes, index_table, value_table, index_stream, rest = split(
            data, [*head, len(data) - sum(head)], what)
        diffs = _decode_symbols(index_table, index_stream, 1 << index_bits, entries,
                                f"{what} indices")
        positions = relative_positions(diffs, numel, f"{what} index")
        if codes:
            book = read_codebook(book_bytes, codes, word)
            values = book[_decode_symbols(value_table, rest, codes, entries, f"{what} values")]
        elif len(rest) != entries * word.itemsize:
            fail(f"{what} values are {len(rest)} bytes; {entries} need {entries * word.itemsize}")
        else:
            values = np.frombuffer(rest, dtype=word)
        out = np.zeros(numel, dtype=word)
        out[positions] = values
        return words_to_tensor(out, shape, dtype)

    def max_numel(self, params: dict[str, Any], length: int, shape: Sequence[int],
                  itemsize: int, version: int) -> int:
        entries = int_param(params, "entries", self.name)
        bits = int_param(params, "index_bits", self.name, lo=1, hi=16)
        index_bytes = int_param(params, "index_bytes", self.name)
        return super().max_numel(params, length, shape, itemsize, version) if version < 2 \
            else relative_bound(entries, bits, min(index_bytes, length))

    def min_size(self, stats: TensorStats) -> int:
        entries = min_entries(stats)
        index = table_size(2) + packed_size(entries, 1)
        if not entries:
            return index
        codes = max(stats.distinct_nonzero, 1)
        stream = max(entries, math.ceil(stats.entropy_bits_nonzero))
        coded = codes * stats.itemsize + table_size(codes) + (stream + 7) // 8
        return index + min(entries * stats.itemsize, coded)


@dataclass(frozen=True)
class StreamEntropy:
    """One symbol stream: its empirical entropy vs. its Huffman-coded size.

    ``entropy_bits`` and ``huffman_bits`` are bits per symbol (the stream alone);
    ``table_bytes`` is the stored code table; ``total_bytes`` = stream + table bytes.
    """

    name: str
    symbols: int
    alphabet: int
    entropy_bits: float
    huffman_bits: float
    table_bytes: int
    total_bytes: int

    @property
    def excess(self) -> float:
        """Huffman bits over entropy bits, as a fraction (0.01 = 1% above the entropy)."""
        if self.entropy_bits == 0:
            return 0.0 if self.huffman_bits <= 1 else math.inf
        return self.huffman_bits / self.entropy_bits - 1


@dataclass(frozen=True)
class EntropyReport:
    """Per-stream entropy of a tensor, and its bytes under every lossless encoding.

    Streams: ``weights`` (codebook index of every element), ``indices`` (``sparse_rel``
    relative indices at ``index_bits``) and ``values`` (codebook index of each
    ``sparse_rel`` entry). ``encoded_bytes``: (encoding name, data bytes) pairs.
    """

    numel: int
    dense_bytes: int
    index_bits: int
    streams: tuple[StreamEntropy, ...]
    encoded_bytes: tuple[tuple[str, int], ...]

    def stream(self, name: str) -> StreamEntropy:
        """The stream called ``name``."""
        return next(s for s in self.streams if s.name == name)


def stream_entropy(name: str, symbols: np.ndarray, alphabet: int) -> StreamEntropy:
    """Entropy and Huffman cost of ``symbols`` in ``range(alphabet)``."""
    counts = np.bincount(symbols.astype(np.int64), minlength=alphabet)
    table, stream = _coded(symbols, alphabet)
    lengths = code_lengths(counts)
    coded = int((counts * lengths).sum())
    per = coded / symbols.size if symbols.size else 0.0
    return StreamEntropy(name, int(symbols.size), alphabet, _entropy(counts), per,
                         len(table), len(table) + len(stream))


def entropy_report(tensor: torch.Tensor) -> EntropyReport:
    """How close Huffman coding comes to the entropy of ``tensor``'s streams (any dtype).

    Encodes the tensor every lossless way for ``encoded_bytes``: meant for reports, not
    for large tensors in a hurry.
    """
    words = element_words(tensor)
    codebook, indices = build_codebook(words)
    diffs, entry_words, index_bits = _entries(tensor, None)
    entry_book, entry_indices = build_codebook(entry_words)
    streams = (stream_entropy("weights", indices, codebook.size),
               stream_entropy("indices", diffs, 1 << index_bits),
               stream_entropy("values", entry_indices, entry_book.size))
    sizes = tuple((name, len(ENCODINGS.get(name).encode(tensor)[0])) for name in ENCODINGS
                  if ENCODINGS.get(name).lossless and ENCODINGS.get(name).supports(tensor.dtype))
    return EntropyReport(int(words.size), int(words.nbytes), index_bits, streams, sizes)


ENCODINGS.register(CodebookHuffman.name, CodebookHuffman())
ENCODINGS.register(SparseRelHuffman.name, SparseRelHuffman())
