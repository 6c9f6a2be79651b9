"""Canonical Huffman codes (Huffman, 1952): code lengths, tables, encoding.

A code is given by the length of each symbol's code (0 = unused, at most
:data:`MAX_LENGTH`); canonical codes follow from the lengths (symbols sorted by (length,
symbol) get consecutive codes). Streams are written most significant bit first into a
big-endian bit stream, padded with 0 bits. Decoding (vectorised) is in
:mod:`nncompress.formats.prefix_decode`.
"""

from __future__ import annotations

import numpy as np

from nncompress.formats._checks import fail

__all__ = [
    "LENGTH_BITS",
    "MAX_LENGTH",
    "canonical",
    "check_lengths",
    "code_lengths",
    "huffman_encode",
]

#: Longest code; a code table stores each length in 5 bits.
MAX_LENGTH = 24
LENGTH_BITS = 5
#: Alphabets larger than this get a complete near-fixed-length code (no Python-loop tree).
MAX_TREE_ALPHABET = 1 << 16
#: Symbols encoded / decoded per vectorised step.
_CHUNK = 1 << 18


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


def canonical(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
    symbols = np.asarray(symbols, dtype=np.int64).reshape(-1)
    codes, _ = canonical(lengths)
    top = int(lengths.max(initial=1))
    bits = []
    for start in range(0, symbols.size, _CHUNK):
        chunk = symbols[start:start + _CHUNK]
        sym_len = lengths[chunk]
        aligned = (codes[chunk] << (32 - sym_len)).astype(">u4")  # left-justified codes
        matrix = np.unpackbits(aligned.view(np.uint8).reshape(-1, 4), axis=1)[:, :top]
        bits.append(matrix[np.arange(top) < sym_len[:, None]])
    return np.packbits(np.concatenate(bits) if bits else np.zeros(0, np.uint8)).tobytes()
