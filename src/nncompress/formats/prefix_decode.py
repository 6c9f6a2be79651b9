"""Vectorised decoding of canonical Huffman streams (numpy, no per-symbol Python loop).

In the spirit of Weissenberger & Schmidt, "Massively Parallel Huffman Decoding on GPUs"
(2018): the stream is cut into segments of 2**20 bits (decoded one after the other, so
their work stays in cache) and each segment into blocks of 512 bits. Every block is
decoded speculatively from a little before its first bit (to synchronise), all blocks at
once, marking the bits where its codes start. A Huffman code resynchronises within a few
codes, so the true code sequence, once it enters a block, soon meets the block's
speculative codes and follows them from there: where each block is entered and where it
meets them is checked for all blocks at once; the few blocks where that fails are fixed
one by one, or (past a handful) every block's exit is tabled for each of its first
``max length`` bits and the blocks are chained through the table. The symbols are then
read at the marked code starts through a lookup table. Codes of one length need none of
this. Memory: about one byte per stream bit of a segment plus the output (the narrowest
unsigned dtype holding the alphabet).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nncompress.formats._checks import fail
from nncompress.formats.encodings import Buffer
from nncompress.formats.prefix_code import MAX_LENGTH, canonical, check_lengths

__all__ = ["huffman_decode"]

#: Longest code decoded through a direct lookup table (2**16 entries); longer ones search.
_LUT_BITS = 16


@dataclass(frozen=True)
class _Code:
    """Decoding tables of a valid code whose longest code has ``top`` bits.

    ``lut_len`` / ``lut_sym``: length and symbol of the code a ``top``-bit window starts
    with (direct tables when ``top <= 16``), else looked up through ``ends``.
    """

    top: int
    lut_len: np.ndarray | None
    lut_sym: np.ndarray | None
    ends: np.ndarray        # left-justified (top bits) end of each used length's codes
    present: np.ndarray     # the used lengths, ascending
    first: np.ndarray       # canonical index of each used length's first code
    first_code: np.ndarray  # that first code
    order: np.ndarray       # symbols in canonical order

    @classmethod
    def of(cls, lengths: np.ndarray) -> _Code:
        codes, order = canonical(lengths)
        top = int(lengths.max())
        sorted_len = lengths[order]
        present, first = np.unique(sorted_len, return_index=True)
        last = np.append(first[1:], order.size) - 1
        ends = (codes[order[last]] + 1) << (top - present)
        lut_len = lut_sym = None
        if top <= _LUT_BITS:
            span = np.int64(1) << (top - sorted_len)
            lut_len = np.zeros(1 << top, dtype=np.uint64)
            lut_sym = np.zeros(1 << top, dtype=np.int64)
            filled = int(span.sum())  # 2**top for a complete code
            lut_len[:filled] = np.repeat(sorted_len, span)
            lut_sym[:filled] = np.repeat(order, span)
        return cls(top, lut_len, lut_sym, ends, present, first, codes[order[first]], order)

    def length(self, window: np.ndarray) -> np.ndarray:
        """Code length at each ``top``-bit window (0: no code starts there)."""
        if self.lut_len is not None:
            return self.lut_len[window]
        window = window.astype(np.int64)
        level = np.searchsorted(self.ends, window, side="right")
        return np.where(level < self.present.size,
                        self.present[np.minimum(level, self.present.size - 1)],
                        0).astype(np.uint64)

    def symbol(self, window: np.ndarray) -> np.ndarray:
        """Symbol of the code each ``top``-bit window starts with (the code must exist)."""
        if self.lut_sym is not None:
            return self.lut_sym[window]
        window = window.astype(np.int64)
        level = np.searchsorted(self.ends, window, side="right")
        rank = (self.first[level] + (window >> (self.top - self.present[level]))
                - self.first_code[level])
        return self.order[rank]


class _Segment:
    """Bits ``[lo, hi)`` of a stream read MSB first (``lo`` a multiple of 8), with
    positions relative to ``lo``; ``window(p)``: the ``top`` bits from bit ``p`` (zero
    bits beyond the stream's end)."""

    def __init__(self, raw: np.ndarray, lo: int, hi: int, top: int) -> None:
        chunk = np.zeros((hi - lo + 7) // 8 + 2 * _PAD, dtype=np.uint8)
        piece = raw[lo // 8:lo // 8 + chunk.size]
        chunk[:piece.size] = piece
        view = np.ndarray((chunk.size - _PAD,), dtype=">u8", buffer=chunk, strides=(1,))
        self.words = view.astype(np.uint64)
        self.lo, self.hi, self.top = lo, hi, top
        self.drop = np.uint64(64 - top)

    def window(self, pos: np.ndarray) -> np.ndarray:
        return (self.words[pos >> _THREE] << (pos & _SEVEN)) >> self.drop


_PAD = 8
#: Code starts read per vectorised step (fits in cache).
_READ = 1 << 15
_THREE, _SEVEN = np.uint64(3), np.uint64(7)


def huffman_decode(data: Buffer, lengths: np.ndarray, count: int, what: str) -> np.ndarray:
    """Inverse of :func:`huffman_encode`: exactly ``count`` symbols filling ``data`` (the
    narrowest unsigned dtype holding the alphabet); a truncated, overlong or badly
    padded stream raises FormatError."""
    check_lengths(lengths, what)
    if count == 0 or not (lengths > 0).any():
        if len(data) or count:
            fail(f"{what} holds {len(data)} bytes for {count} symbols of an empty code")
        return np.zeros(0, dtype=_index_dtype(lengths.size))
    if len(data) > (count * MAX_LENGTH + 7) // 8 or len(data) < (count + 7) // 8:
        fail(f"{what} is {len(data)} bytes, impossible for {count} symbols")
    code = _Code.of(lengths)
    raw = np.frombuffer(data, dtype=np.uint8)
    total = 8 * raw.size
    fixed = int(lengths[lengths > 0].min()) == code.top
    out = np.empty(count, dtype=_index_dtype(lengths.size))
    filled, entry, last = 0, 0, 0
    for lo in range(0, total, _SEGMENT):
        if filled == count:
            break
        seg = _Segment(raw, lo, min(total, lo + _SEGMENT), code.top)
        if fixed:  # code starts are known
            starts = np.arange(entry - lo, seg.hi - lo, code.top, dtype=np.uint64)
        else:
            starts = _segment_starts(seg, code, entry - lo)
        take = starts[:count - filled]
        _read_symbols(seg, code, take, out[filled:filled + take.size], what)
        filled += take.size
        if take.size:
            last = lo + int(take[-1]) + int(code.length(seg.window(take[-1:]))[0])
        entry = lo + int(starts[-1]) + int(code.length(seg.window(starts[-1:]))[0]) \
            if starts.size else entry
    _check_end(raw, filled, count, last, what)
    return out


def _read_symbols(seg: _Segment, code: _Code, starts: np.ndarray, out: np.ndarray,
                  what: str) -> None:
    """``out[:] =`` the symbols of the codes at ``starts`` (in cache-sized chunks)."""
    complete = code.order.size > 1  # only a one-symbol code leaves windows undecodable
    for lo in range(0, starts.size, _READ):
        windows = seg.window(starts[lo:lo + _READ])
        if not complete and not code.length(windows).all():
            fail(f"{what} holds an invalid code")
        out[lo:lo + _READ] = code.symbol(windows)


def _index_dtype(alphabet: int) -> np.dtype:
    """The narrowest unsigned dtype holding symbols ``0 .. alphabet - 1``."""
    return next(np.dtype(t) for t in ("u1", "u2", "u4", "u8") if alphabet <= 1 << (
        8 * np.dtype(t).itemsize))


def _check_end(raw: np.ndarray, filled: int, count: int, end: int, what: str) -> None:
    """The ``count``-th code must end in the last byte, followed by zero padding bits."""
    total = 8 * raw.size
    if filled < count:
        fail(f"{what} is truncated: it ends after {filled} of {count} symbols")
    if end > total:
        fail(f"{what} is truncated: its last code runs past the end")
    if total - end >= 8:
        fail(f"{what} has {total - end} bits left after {count} symbols")
    if int(raw[-1]) & ((1 << (total - end)) - 1):
        fail(f"{what} has padding bits set")


#: Bits decoded per segment (all of a segment's blocks at once, in cache) and per block.
_SEGMENT = 1 << 20
_BLOCK = 512
#: Code lengths (of the longest code) each speculative lane decodes before its block.
_WARM = 2
#: Blocks per segment whose true codes are followed one by one before all are tabled.
_MAX_FIXES = 16


def _segment_starts(seg: _Segment, code: _Code, entry: int) -> np.ndarray:
    """Code starts (relative to the segment) of the true code sequence, which enters the
    segment at bit ``entry`` (relative; ``0 <= entry < top``)."""
    span = seg.hi - seg.lo
    begin = np.arange(0, span, _BLOCK, dtype=np.uint64)
    end = np.minimum(begin + np.uint64(_BLOCK), np.uint64(span))
    marks = np.zeros(span + code.top + 1, dtype=bool)
    exits = _run_lanes(seg, code, begin, end, marks, mark=True,
                       warm=np.minimum(begin, np.uint64(_WARM * code.top)))
    entries, meets = _entries(seg, code, begin, end, marks, exits, entry)
    # before its meeting point a block's speculative code starts are not the true ones
    marks[_ranges(begin, meets.astype(np.uint64))] = False
    late = np.flatnonzero(meets > entries)
    _run_lanes(seg, code, entries[late], meets[late], marks, mark=True)
    return np.flatnonzero(marks[:span]).view(np.uint64)


def _ranges(start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """The concatenated index ranges ``[start[i], stop[i])``."""
    size = np.maximum(stop.astype(np.int64) - start.astype(np.int64), 0)
    offset = np.arange(int(size.sum())) - np.repeat(np.cumsum(size) - size, size)
    return np.repeat(start.astype(np.int64), size) + offset


def _run_lanes(seg: _Segment, code: _Code, pos: np.ndarray, end: np.ndarray,
               marks: np.ndarray, *, mark: bool, stop_on_mark: bool = False,
               warm: np.ndarray | None = None) -> np.ndarray:
    """Decode from every ``pos`` until ``end`` (or, with ``stop_on_mark``, until a marked
    code start): returns where each lane stopped (int64), ``-1 - p`` for a lane that met
    a mark at ``p``. With ``mark``, every code start passed is marked. ``warm``: bits
    each lane first decodes before ``pos`` without marking (to synchronise)."""
    out = np.empty(pos.size, dtype=np.int64)
    lane = np.arange(pos.size)
    pos, end = pos.astype(np.uint64), end.astype(np.uint64)
    if warm is not None:
        start = pos
        pos = pos - warm
        while True:
            behind = pos < start
            if not behind.any():
                break
            pos += np.where(behind, code.length(seg.window(pos)), np.uint64(0))
    while lane.size:
        live = pos < end
        if stop_on_mark:
            met = live & marks[pos]
            if met.any():
                out[lane[met]] = -1 - pos[met].astype(np.int64)
                live &= ~met
        if not live.all():
            over = ~live & (pos >= end)
            out[lane[over]] = pos[over]
            lane, pos, end = lane[live], pos[live], end[live]
            if not lane.size:
                break
        if mark:
            marks[pos] = True
        step = code.length(seg.window(pos))
        if code.lut_len is None and not step.all():
            fail("prefix-code stream holds an invalid code")
        pos += step
    return out


def _entries(seg: _Segment, code: _Code, begin: np.ndarray, end: np.ndarray,
             marks: np.ndarray, exits: np.ndarray, entry: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """Where the true code sequence enters each block of the segment, and where it meets
    the block's speculative codes (the block's end if it never does).

    Usually every block is entered where the speculative codes of the one before leave
    it and its own speculative codes are met at once or soon: checked for all blocks at
    once. A block where that fails is fixed one at a time; past :data:`_MAX_FIXES`
    such blocks, each of the first ``top`` bits of every later block gets its own exit
    and the blocks are chained through them.
    """
    entries = np.concatenate([[entry], exits[:-1]]).astype(np.int64)
    leave, meets = _leave(seg, code, entries, end, marks, exits)
    bad = [int(b) for b in np.flatnonzero(leave != exits)]
    fixes = 0
    while bad and bad[0] + 1 < begin.size:
        b = bad.pop(0) + 1
        entries[b] = leave[b - 1]
        if fixes == _MAX_FIXES:
            _chain_tail(seg, code, begin[b:], end[b:], marks, exits[b:], entries[b:],
                        meets[b:])
            break
        fixes += 1
        one = slice(b, b + 1)
        leave[one], meets[one] = _leave(seg, code, entries[one], end[one], marks, exits[one])
        if leave[b] != exits[b] and (not bad or bad[0] != b):
            bad.insert(0, b)
    return entries, meets


def _leave(seg: _Segment, code: _Code, starts: np.ndarray, end: np.ndarray,
           marks: np.ndarray, exits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For a decoding from ``starts[i]`` in block ``i``: where it leaves the block and
    where it meets the block's speculative code starts (``end`` if it never does)."""
    starts = starts.astype(np.int64)
    end = end.astype(np.int64)
    inside = starts < end
    on = inside & marks[starts]
    leave = np.where(inside, exits, starts)
    meets = np.where(inside & ~on, end, starts)
    todo = np.flatnonzero(inside & ~on)
    found = _run_lanes(seg, code, starts[todo], end[todo], marks, mark=False,
                       stop_on_mark=True)
    met = found < 0
    leave[todo] = np.where(met, exits[todo], found)
    meets[todo[met]] = -1 - found[met]
    return leave, meets


def _chain_tail(seg: _Segment, code: _Code, begin: np.ndarray, end: np.ndarray,
                marks: np.ndarray, exits: np.ndarray, entries: np.ndarray,
                meets: np.ndarray) -> None:
    """Fill ``entries`` (from ``entries[0]``, known) and ``meets`` of consecutive blocks
    from every block's exit and meeting point for each of its first ``top`` bits."""
    top = code.top
    starts = (begin[:, None] + np.arange(top, dtype=np.uint64)[None, :]).reshape(-1)
    block = np.repeat(np.arange(begin.size), top)
    leave, meet = _leave(seg, code, starts, end[block], marks, exits[block])
    leave, meet = leave.reshape(-1, top).tolist(), meet.reshape(-1, top).tolist()
    pos = int(entries[0])
    for b, first in enumerate(begin.tolist()):
        entries[b] = pos
        if pos - first < top:
            meets[b], pos = meet[b][pos - first], leave[b][pos - first]
        else:  # the stream ended before this block
            meets[b] = pos
