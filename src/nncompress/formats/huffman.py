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
such; decoding also checks the table (Kraft equality), symbol counts and padding.
:func:`entropy_report` says how close each stream comes to its empirical entropy.
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
from nncompress.formats.encodings import ENCODINGS, Encoding, dtype_info, expect_params
from nncompress.formats.packed import (
    _WORD,
    INDEX_BITS,
    build_codebook,
    element_words,
    pack_bits,
    read_codebook,
    relative_diffs,
    relative_positions,
    split,
    unpack_bits,
    words_to_tensor,
)

__all__ = [
    "CodebookHuffman",
    "EntropyReport",
    "SparseRelHuffman",
    "StreamEntropy",
    "code_lengths",
    "entropy_report",
    "huffman_decode",
    "huffman_encode",
]

#: Longest code; the table stores each length in 5 bits.
MAX_LENGTH = 24
LENGTH_BITS = 5
#: Alphabets larger than this get a complete near-fixed-length code (no Python-loop tree).
MAX_TREE_ALPHABET = 1 << 16


def _tree_lengths(counts: np.ndarray) -> np.ndarray:
    """Huffman code lengths of the symbols with count > 0 (others 0), unlimited depth.

    The two-queue construction on counts sorted ascending: leaves ``0..n-1``, internal
    nodes ``n..2n-2`` in creation order (so every parent comes after its children).
    """
    lengths = np.zeros(counts.size, dtype=np.int64)
    used = np.flatnonzero(counts)
    if used.size == 1:
        lengths[used] = 1
    if used.size <= 1:
        return lengths
    order = used[np.argsort(counts[used], kind="stable")]
    leaf, n = counts[order].tolist(), int(used.size)
    parent, internal, i, j = [0] * (2 * n - 1), [], 0, 0
    for node in range(n, 2 * n - 1):
        total = 0
        for _ in range(2):
            if j >= len(internal) or (i < n and leaf[i] <= internal[j]):
                parent[i], total, i = node, total + leaf[i], i + 1
            else:
                parent[n + j], total, j = node, total + internal[j], j + 1
        internal.append(total)
    depth = [0] * (2 * n - 1)
    for node in range(2 * n - 3, -1, -1):
        depth[node] = depth[parent[node]] + 1
    lengths[order] = depth[:n]
    return lengths


def _flat_lengths(used: np.ndarray, size: int) -> np.ndarray:
    """A complete code giving ``len(used)`` symbols lengths ``L - 1`` or ``L``."""
    lengths = np.zeros(size, dtype=np.int64)
    top = max(1, (used.size - 1).bit_length())
    short = (1 << top) - used.size
    lengths[used] = top
    lengths[used[:short]] = top - 1
    return lengths


def code_lengths(counts: np.ndarray, limit: int = MAX_LENGTH) -> np.ndarray:
    """Huffman code lengths for symbol ``counts`` (0 = symbol unused), none over ``limit``.

    A code that would be too deep is rebuilt from halved counts (rounded up, so no used
    symbol drops out) until it fits; alphabets over :data:`MAX_TREE_ALPHABET` used symbols
    get a near-fixed-length complete code.
    """
    counts = np.asarray(counts, dtype=np.int64)
    used = np.flatnonzero(counts)
    if used.size > 1 << limit:
        raise ValueError(f"{used.size} symbols need codes longer than {limit} bits")
    if used.size > MAX_TREE_ALPHABET:
        return _flat_lengths(used, counts.size)
    lengths = _tree_lengths(counts)
    while lengths.max(initial=0) > limit:
        counts = np.where(counts > 0, (counts + 1) // 2, 0)
        lengths = _tree_lengths(counts)
    return lengths


def _canonical(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(code of each symbol, symbols in canonical order) for valid code ``lengths``.

    In canonical order each code is the Kraft prefix sum of the codes before it,
    left-justified to :data:`MAX_LENGTH` bits, cut to its own length.
    """
    order = np.lexsort((np.arange(lengths.size), lengths))
    order = order[lengths[order] > 0]
    shift = MAX_LENGTH - lengths[order]
    step = np.int64(1) << shift
    codes = np.zeros(lengths.size, dtype=np.int64)
    codes[order] = (np.cumsum(step) - step) >> shift
    return codes, order


def check_lengths(lengths: np.ndarray, what: str) -> None:
    """A usable code table: lengths 0..MAX_LENGTH, Kraft sum exactly 1 (or one 1-bit code)."""
    if lengths.size and int(lengths.max()) > MAX_LENGTH:
        fail(f"{what} code table has a length {int(lengths.max())} over {MAX_LENGTH}")
    used = lengths[lengths > 0]
    kraft = int(np.sum(np.int64(1) << (MAX_LENGTH - used)))
    if used.size == 1 and int(used[0]) == 1:
        return
    if used.size and kraft != 1 << MAX_LENGTH:
        fail(f"{what} code table is not a complete prefix code (Kraft sum "
             f"{kraft / (1 << MAX_LENGTH):.6g}, must be 1)")


def huffman_encode(symbols: np.ndarray, lengths: np.ndarray) -> bytes:
    """``symbols`` (each with a non-zero length) coded MSB first, padded with 0 bits."""
    symbols = np.asarray(symbols, dtype=np.int64)
    codes, _ = _canonical(lengths)
    sym_len, sym_code = lengths[symbols], codes[symbols]
    starts = np.cumsum(sym_len) - sym_len
    bits = np.zeros(int(sym_len.sum()), dtype=np.uint8)
    for j in range(int(sym_len.max(initial=0))):
        has = sym_len > j
        bits[starts[has] + j] = (sym_code[has] >> (sym_len[has] - 1 - j)) & 1
    return np.packbits(bits).tobytes()


def huffman_decode(data: bytes | memoryview, lengths: np.ndarray, count: int,
                   what: str) -> np.ndarray:
    """Inverse of :func:`huffman_encode`: exactly ``count`` symbols filling ``data``.

    Every bit position's left-justified window of :data:`MAX_LENGTH` bits is decoded at
    once (numpy); then the chain of code starts is followed from bit 0.
    """
    check_lengths(lengths, what)
    if count == 0 or not (lengths > 0).any():
        if len(data) or count:
            fail(f"{what} holds {len(data)} bytes for {count} symbols of an empty code")
        return np.zeros(0, dtype=np.int64)
    if len(data) > (count * MAX_LENGTH + 7) // 8 or len(data) < (count + 7) // 8:
        fail(f"{what} is {len(data)} bytes, impossible for {count} symbols")
    codes, order = _canonical(lengths)
    nbits = 8 * len(data)
    window = _windows(data)
    sorted_len = lengths[order]
    present, first = np.unique(sorted_len, return_index=True)   # lengths in use, ascending
    last = np.append(first[1:], order.size) - 1
    ends = (codes[order[last]] + 1) << (MAX_LENGTH - present)     # left-justified code ends
    level = np.searchsorted(ends, window, side="right")
    width = np.where(level < present.size, present[np.minimum(level, present.size - 1)], 0)
    starts, end = _follow(width.tolist(), count, nbits, what)
    if end < nbits and window[end] >> (MAX_LENGTH - (nbits - end)):
        fail(f"{what} has padding bits set")
    level, win = level[starts], window[starts]
    rank = first[level] + (win >> (MAX_LENGTH - present[level])) - codes[order[first[level]]]
    return order[rank]


def _windows(data: bytes | memoryview) -> np.ndarray:
    """For every bit position, the next :data:`MAX_LENGTH` bits as an integer (MSB first)."""
    raw = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    padded = np.concatenate([raw, np.zeros(4, dtype=np.int64)])
    word = (padded[:-3] << 24) | (padded[1:-2] << 16) | (padded[2:-1] << 8) | padded[3:]
    pos = np.arange(8 * raw.size, dtype=np.int64)
    return ((word[pos >> 3] << (pos & 7)) >> (32 - MAX_LENGTH)) & ((1 << MAX_LENGTH) - 1)


def _follow(width: list[int], count: int, total: int, what: str) -> tuple[np.ndarray, int]:
    """(the first ``count`` code starts, end bit); the last code must end in the last byte."""
    starts = [0] * count
    pos = 0
    for i in range(count):
        if pos >= total:
            fail(f"{what} is truncated: it ends after {i} of {count} symbols")
        if not width[pos]:
            fail(f"{what} holds an invalid code at bit {pos}")
        starts[i] = pos
        pos += width[pos]
    if pos > total:
        fail(f"{what} is truncated: its last code runs past the end")
    if total - pos >= 8:
        fail(f"{what} has {total - pos} bits left after {count} symbols")
    return np.asarray(starts, dtype=np.int64), pos


def pack_table(lengths: np.ndarray) -> bytes:
    return pack_bits(lengths.astype(np.uint64), LENGTH_BITS)


def read_table(data: bytes | memoryview, size: int, what: str) -> np.ndarray:
    return unpack_bits(data, LENGTH_BITS, size, f"{what} code table").astype(np.int64)


def table_size(size: int) -> int:
    return (size * LENGTH_BITS + 7) // 8


def _coded(symbols: np.ndarray, alphabet: int) -> tuple[bytes, bytes]:
    """(code table, stream) of ``symbols`` in ``range(alphabet)``."""
    counts = np.bincount(symbols.astype(np.int64), minlength=alphabet)
    lengths = code_lengths(counts)
    return pack_table(lengths), huffman_encode(symbols, lengths)


def _check_crc(data: bytes | memoryview, crc: Any, what: str) -> None:
    expected = check_int(crc, f"{what} crc32", hi=2**32 - 1)
    if zlib.crc32(data) != expected:
        fail(f"{what} data fails its CRC-32 check: corrupted or truncated")


def _decode_symbols(table: bytes | memoryview, stream: bytes | memoryview, alphabet: int,
                    count: int, what: str) -> np.ndarray:
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

    def encode(self, tensor: torch.Tensor) -> tuple[bytes, dict[str, Any]]:
        codebook, indices = build_codebook(element_words(tensor))
        table, stream = _coded(indices, codebook.size)
        data = codebook.tobytes() + table + stream
        return data, {"codes": int(codebook.size), "crc32": zlib.crc32(data)}

    def decode(self, data: bytes | memoryview, params: dict[str, Any], shape: Sequence[int],
               dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        expect_params(params, self.name, ("codes", "crc32"))
        codes = check_int(params["codes"], "codebook_huffman codes", lo=min(numel, 1),
                          hi=numel)
        _check_crc(data, params["crc32"], self.name)
        word = _WORD[dtype_info(dtype).itemsize]
        head = [codes * word.itemsize, table_size(codes)]
        if len(data) < sum(head):
            fail(f"codebook_huffman data is {len(data)} bytes; its tables need {sum(head)}")
        book_bytes, table, stream = split(data, [*head, len(data) - sum(head)], self.name)
        book = read_codebook(book_bytes, codes, word)
        indices = _decode_symbols(table, stream, codes, numel, self.name)
        return words_to_tensor(book[indices], shape, dtype)


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


def best_huffman_index_bits(positions: np.ndarray, value_bits: float) -> int:
    """The index width whose Huffman-coded relative indices + table are smallest.

    Each entry (filler or not) also costs one value of about ``value_bits`` bits.
    """
    costs = []
    for bits in INDEX_BITS:
        diffs, _ = relative_diffs(positions, bits)
        counts = np.bincount(diffs.astype(np.int64), minlength=1 << bits)
        coded = int((counts * code_lengths(counts)).sum())
        costs.append((coded + diffs.size * value_bits) / 8 + table_size(1 << bits))
    return INDEX_BITS[int(np.argmin(costs))]


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
    KEYS = ("entries", "index_bits", "codes", "index_bytes", "crc32")

    def encode(self, tensor: torch.Tensor,
               index_bits: int | None = None) -> tuple[bytes, dict[str, Any]]:
        """``index_bits`` (1..16) forces the index width; by default the smallest wins."""
        words = element_words(tensor)
        positions = np.flatnonzero(words)
        if index_bits is None:
            index_bits = best_huffman_index_bits(positions, _value_bits(words[positions]))
        diffs, real = relative_diffs(positions, index_bits)
        entry_words = np.zeros(diffs.size, dtype=words.dtype)
        entry_words[real] = words[positions]
        index_table, index_stream = _coded(diffs, 1 << index_bits)
        book, value_table, values = np.zeros(0, dtype=words.dtype), b"", entry_words.tobytes()
        codebook, indices = build_codebook(entry_words)
        if codebook.size * words.itemsize < len(values):
            table, stream = _coded(indices, codebook.size)
            if len(table) + len(stream) + codebook.size * words.itemsize < len(values):
                book, value_table, values = codebook, table, stream
        data = book.tobytes() + index_table + value_table + index_stream + values
        return data, {"entries": int(diffs.size), "index_bits": index_bits,
                      "codes": int(book.size), "index_bytes": len(index_stream),
                      "crc32": zlib.crc32(data)}

    def decode(self, data: bytes | memoryview, params: dict[str, Any], shape: Sequence[int],
               dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        expect_params(params, self.name, self.KEYS)
        what = self.name
        entries = check_int(params["entries"], f"{what} entries", hi=numel)
        index_bits = check_int(params["index_bits"], f"{what} index_bits", lo=1, hi=16)
        codes = check_int(params["codes"], f"{what} codes", hi=entries)
        index_bytes = check_int(params["index_bytes"], f"{what} index_bytes", hi=len(data))
        _check_crc(data, params["crc32"], what)
        word = _WORD[dtype_info(dtype).itemsize]
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
    """How close Huffman coding comes to the entropy of ``tensor``'s streams (any dtype)."""
    words = element_words(tensor)
    codebook, indices = build_codebook(words)
    positions = np.flatnonzero(words)
    index_bits = best_huffman_index_bits(positions, _value_bits(words[positions]))
    diffs, real = relative_diffs(positions, index_bits)
    entry_words = np.zeros(diffs.size, dtype=words.dtype)
    entry_words[real] = words[positions]
    entry_book, entry_indices = build_codebook(entry_words)
    streams = (stream_entropy("weights", indices, codebook.size),
               stream_entropy("indices", diffs, 1 << index_bits),
               stream_entropy("values", entry_indices, entry_book.size))
    sizes = tuple((name, len(ENCODINGS.get(name).encode(tensor)[0])) for name in ENCODINGS
                  if ENCODINGS.get(name).lossless and ENCODINGS.get(name).supports(tensor.dtype))
    return EntropyReport(int(words.size), int(words.nbytes), index_bits, streams, sizes)



ENCODINGS.register(CodebookHuffman.name, CodebookHuffman())
ENCODINGS.register(SparseRelHuffman.name, SparseRelHuffman())
