"""Which lossless encoding ``save`` gives a tensor: the smallest, found without trying all.

Every automatic encoding states a lower bound of its size from cheap statistics
(:meth:`~nncompress.formats.Encoding.min_size`: element count and size, non-zero count,
distinct values); the candidates are encoded in order of their bounds, and one whose bound
cannot beat the best size found so far is never encoded. With exact statistics (tensors up
to :data:`EXACT_ELEMENTS` elements, and any tensor with few distinct values) the result is
the exhaustive choice (:func:`encoded_sizes` + :func:`smallest_encoding`); larger tensors
with many distinct values get the distinct counts estimated from a seeded sample (Chao,
"Nonparametric estimation of the number of classes in a population", 1984), so a trained
dense weight is written dense after counting its non-zeros and looking at 16k of its
elements. (Estimated bounds may let a slightly smaller encoding go untried; the result is
lossless whatever is chosen.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from nncompress.formats.encodings import ENCODINGS, Buffer, Encoding, TensorStats, dtype_info
from nncompress.formats.packed import build_codebook, csr_view, element_words

__all__ = ["Choice", "choose_encoding", "encoded_sizes", "smallest_encoding", "smallest_sizes",
           "tensor_stats"]

#: Tensors up to this many elements (or non-zeros) get exact distinct counts.
EXACT_ELEMENTS = 1 << 18
#: Elements sampled (seeded) to estimate the distinct values of a larger tensor.
SAMPLE = 1 << 14


@dataclass(frozen=True)
class Choice:
    """An encoded tensor: the encoding's name, its data and params."""

    encoding: str
    data: Buffer
    params: dict

    @property
    def size(self) -> int:
        return len(self.data)


def _key(name: str, size: int) -> tuple[int, bool, str]:
    """Ordering of candidates: fewest bytes, then dense, then by name."""
    return (size, name != "dense", name)


def smallest_encoding(sizes: Mapping[str, int]) -> str:
    """The encoding ``save`` picks from ``{name: bytes}``: the fewest bytes, dense on
    ties, then by name."""
    return min(sizes, key=lambda name: _key(name, sizes[name]))


def _candidates(dtype: torch.dtype) -> list[Encoding]:
    """The lossless encodings the automatic choice may use for ``dtype``."""
    codecs = (ENCODINGS.get(name) for name in ENCODINGS.names())
    return [c for c in codecs if c.lossless and c.auto and c.supports(dtype)]


def encoded_sizes(tensor: torch.Tensor) -> dict[str, int]:
    """Data bytes of ``tensor`` under every lossless encoding ``save`` may pick (encodes
    it every way: the exhaustive reference of the automatic choice)."""
    return {c.name: len(c.encode(tensor)[0]) for c in _candidates(tensor.dtype)}


def _chao1(sample: np.ndarray, population: int) -> int:
    """Distinct values of a population estimated from a sample of it (Chao 1984)."""
    if not sample.size:
        return min(population, 1)
    counts = np.unique(sample, return_counts=True)[1]
    once, twice = int((counts == 1).sum()), int((counts == 2).sum())
    return int(min(population, counts.size + once * (once - 1) / (2 * (twice + 1))))


def _census(words: np.ndarray) -> tuple[int, float, int, float]:
    """Distinct words and their entropy bits (see ``TensorStats``), of all and of the
    non-zero words; exact (cheap when the words are few)."""
    if not words.size:
        return 0, 0.0, 0, 0.0
    book, indices = build_codebook(words)
    counts = np.bincount(indices, minlength=book.size)
    nonzero = counts[1:] if book[0] == 0 else counts
    return int(book.size), _bits(counts), int(nonzero.size), _bits(nonzero)


def _bits(counts: np.ndarray) -> float:
    """Empirical entropy times count of a histogram (slightly rounded down)."""
    total = float(counts.sum())
    if total <= 0:
        return 0.0
    p = counts[counts > 0] / total
    return max(0.0, float(-(counts[counts > 0] * np.log2(p)).sum()) * (1 - 1e-9) - 1e-6)


def tensor_stats(tensor: torch.Tensor) -> TensorStats:
    """Element count and size, non-zeros and distinct values (exact, or estimated for a
    large tensor with many distinct values)."""
    words = element_words(tensor)
    numel, itemsize = int(words.size), dtype_info(tensor.dtype).itemsize
    nonzero = int(np.count_nonzero(words))
    rows, cols = csr_view(tuple(tensor.shape))
    exact = numel <= EXACT_ELEMENTS
    if not exact:
        sample = words[np.random.default_rng(0).integers(0, numel, SAMPLE)]
        distinct = _chao1(sample, numel)
        exact = distinct <= SAMPLE // 16  # few values: count them exactly
    if exact:
        distinct, bits, values, bits_nonzero = _census(words)
        return TensorStats(numel, itemsize, nonzero, distinct, values, rows, cols, True, bits,
                           bits_nonzero)
    # the sample's entropy per element underestimates the tensor's (a lenient bound)
    bits = _bits(np.unique(sample, return_counts=True)[1]) * numel / SAMPLE
    if nonzero == numel:
        values, bits_nonzero = distinct, bits
    elif nonzero <= EXACT_ELEMENTS:
        values, bits_nonzero = _census(words[np.flatnonzero(words)])[2:]
    else:
        picked = sample[sample != 0]
        values = _chao1(picked, nonzero)
        bits_nonzero = _bits(np.unique(picked, return_counts=True)[1]) * nonzero / max(
            picked.size, 1)
    return TensorStats(numel, itemsize, nonzero, distinct, values, rows, cols, False, bits,
                       bits_nonzero)


def choose_encoding(tensor: torch.Tensor) -> Choice:
    """The smallest lossless automatic encoding of ``tensor`` (dense on ties), encoding
    only the candidates whose lower bound can beat the best one found so far."""
    return _search(tensor, _candidates(tensor.dtype), lambda codec: True)[0]


def smallest_sizes(tensor: torch.Tensor) -> tuple[Choice, Choice]:
    """(smallest without entropy coding, smallest of all) -- the Deep Compression stages
    before and after Huffman coding -- found as cheaply as :func:`choose_encoding`."""
    candidates = _candidates(tensor.dtype)
    plain, best = _search(tensor, candidates, lambda codec: not codec.entropy_coded)
    return plain, best


def _search(tensor: torch.Tensor, candidates: list[Encoding],
            plain: Callable[[Encoding], bool]) -> tuple[Choice, Choice]:
    """Branch and bound over ``candidates``: (best among ``plain`` ones, best overall)."""
    stats = tensor_stats(tensor)
    bounds = {c.name: c.min_size(stats) for c in candidates}
    best: dict[bool, Choice] = {}
    for codec in sorted(candidates, key=lambda c: _key(c.name, bounds[c.name])):
        lower = _key(codec.name, bounds[codec.name])
        goals = [True, False] if plain(codec) else [False]
        if all(g in best and lower >= _key(best[g].encoding, best[g].size) for g in goals):
            continue
        found = Choice(codec.name, *codec.encode(tensor))
        for goal in goals:
            if goal not in best or _key(found.encoding, found.size) < _key(
                    best[goal].encoding, best[goal].size):
                best[goal] = found
    return best.get(True, best[False]), best[False]
