"""Bit packing and Deep Compression's relative indices (the pieces the packed and the
Huffman-coded encodings share).

Bit packing is little-endian: value ``i`` of width ``b`` occupies stream bits
``[i*b, (i+1)*b)``, least significant first, and stream bit ``j`` is bit ``j % 8`` of byte
``j // 8``; padding bits are 0. Packing and unpacking work in chunks, so their scratch
memory stays a few bytes per element. Relative indices (Han, Mao & Dally, "Deep
Compression", 2015) store each non-zero's distance from the previous one in a fixed
width, with filler entries where a gap overflows it.
"""

from __future__ import annotations

import numpy as np

from nncompress.formats._checks import fail
from nncompress.formats.encodings import WORDS, Buffer, TensorStats

__all__ = ["INDEX_BITS", "MAX_BITS", "bits_for", "min_entries", "pack_bits", "packed_size",
           "relative_bound", "relative_diffs", "relative_positions", "uint_dtype",
           "unpack_bits", "zero_gaps"]

#: Widest bit-packed field (codebook indices, relative indices).
MAX_BITS = 32
#: Relative-index widths the encoders try (the ``sparse_rel`` decoder accepts 1..32).
INDEX_BITS = range(1, 17)
#: Values packed or unpacked per step (a multiple of 8, so chunks end on byte boundaries).
_CHUNK = 1 << 16


def packed_size(count: int, bits: int) -> int:
    """Bytes of ``count`` values of ``bits`` bits each, bit-packed."""
    return (count * bits + 7) // 8


def uint_dtype(bits: int) -> np.dtype:
    """The narrowest little-endian unsigned dtype holding ``bits`` bits."""
    return next(WORDS[n] for n in (1, 2, 4, 8) if bits <= 8 * n)


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Unsigned ``values`` (each ``< 2**bits``) packed little-endian, ``bits`` bits each."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bit width {bits} is outside 1..{MAX_BITS}")
    values = np.asarray(values).reshape(-1)
    if bits in (8, 16, 32):
        return values.astype(uint_dtype(bits), copy=False).tobytes()
    parts = []
    for start in range(0, values.size, _CHUNK):
        chunk = values[start:start + _CHUNK].astype(WORDS[4])
        planes = np.unpackbits(chunk.view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")
        parts.append(np.packbits(planes[:, :bits].reshape(-1), bitorder="little").tobytes())
    return b"".join(parts)


def unpack_bits(data: Buffer, bits: int, count: int, what: str) -> np.ndarray:
    """Inverse of :func:`pack_bits` (the narrowest unsigned dtype holding ``bits``);
    checks the length and padding bits."""
    need = packed_size(count, bits)
    if len(data) != need:
        fail(f"{what} is {len(data)} bytes; {count} values of {bits} bits need {need}")
    raw = np.frombuffer(data, dtype=np.uint8)
    if (count * bits) % 8 and int(raw[-1]) >> ((count * bits) % 8):
        fail(f"{what} has padding bits set")
    word = uint_dtype(bits)
    if bits == 8 * word.itemsize:
        return np.frombuffer(data, dtype=word)
    out = np.empty(count, dtype=word)
    for start in range(0, count, _CHUNK):
        stop = min(count, start + _CHUNK)
        planes = np.unpackbits(raw[start * bits // 8:packed_size(stop, bits)],
                               count=(stop - start) * bits, bitorder="little")
        wide = np.zeros((stop - start, 8 * word.itemsize), dtype=np.uint8)
        wide[:, :bits] = planes.reshape(-1, bits)
        out[start:stop] = np.packbits(wide, axis=1, bitorder="little").view(word).reshape(-1)
    return out


def bits_for(count: int) -> int:
    """Smallest width ``b >= 1`` with ``2**b >= count`` (indices into ``count`` codes)."""
    return max(1, (max(count, 1) - 1).bit_length())


def zero_gaps(positions: np.ndarray, numel: int | None) -> np.ndarray:
    """Zeros before each position (and, given ``numel``, after the last one)."""
    gaps = np.diff(positions.astype(np.int64), prepend=-1) - 1
    if numel is None:
        return gaps
    last = int(positions[-1]) if positions.size else -1
    return np.append(gaps, numel - 1 - last)


def relative_diffs(positions: np.ndarray, index_bits: int,
                   numel: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Han et al. (2015) relative indexing of sorted ``positions`` with ``index_bits`` bits.

    Each entry stores the number of zeros skipped since the previous entry (the first one
    counts from the start), at most ``2**index_bits - 1``; a longer gap gets filler
    entries (value zero) that each skip the maximum. Given ``numel``, the zeros after the
    last position get fillers too, so that fewer than ``2**index_bits`` remain (format
    version 2). Returns ``(diffs [m], real [m])`` where ``real`` marks the actual
    non-zeros.
    """
    span = 1 << index_bits
    gaps = zero_gaps(positions, numel)
    fillers = gaps // span
    per = fillers + 1
    if numel is not None:
        per[-1] = fillers[-1]  # the trailing run has no real entry after its fillers
    ends = np.cumsum(per) - 1
    diffs = np.full(int(per.sum()), span - 1, dtype=uint_dtype(index_bits))
    real = np.zeros(diffs.size, dtype=bool)
    count = positions.size
    diffs[ends[:count]] = gaps[:count] - fillers[:count] * span
    real[ends[:count]] = True
    return diffs, real


def relative_positions(diffs: np.ndarray, numel: int, what: str) -> np.ndarray:
    """Inverse of :func:`relative_diffs`: entry positions; each must lie below ``numel``."""
    positions = np.cumsum(diffs.astype(np.int64) + 1) - 1
    if positions.size and int(positions[-1]) >= numel:
        fail(f"{what} points past the tensor's {numel} elements")
    return positions


def relative_bound(entries: int, index_bits: int, length: int) -> int:
    """Elements ``entries`` relative indices of ``index_bits`` bits can span when the
    zeros after the last entry are fewer than ``2**index_bits`` (format version 2); the
    entries themselves take at least one bit of ``length`` bytes each."""
    return (min(entries, 8 * length) + 1) * (1 << index_bits) - 1


def min_entries(stats: TensorStats) -> int:
    """Fewest relative-index entries (fillers included) any width up to 16 bits needs."""
    return max(stats.nonzero, -(-(stats.numel + 1) // (1 << INDEX_BITS[-1])) - 1)
