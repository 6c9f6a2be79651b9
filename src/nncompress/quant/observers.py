"""Calibration observers: the range ``[lo, hi]`` an activation's int8 type should cover.

Post-training quantization (Jacob et al., 2018, section 3) needs, for every activation, a
real range that its 256 int8 levels cover (:func:`~nncompress.quant.affine.activation_qtype`
widens it to include 0). Each observer here sees the activation over calibration batches
(:meth:`Observer.update`) and then proposes that range (:meth:`Observer.range`):

- ``minmax``: the running minimum and maximum (exact; an outlier stretches the scale).
- ``percentile``: the ``p``-th / ``(100 - p)``-th percentiles (or the ``p``-th of ``|x|``,
  ``symmetric=True``), clipping rare outliers (the ``percentile`` calibrator of TensorRT
  and ONNX Runtime).
- ``mse``: the clipping range whose int8 quantization error over the histogram is
  smallest (clipping traded against rounding: Banner, Nahshan & Soudry, 2019).
- ``kl``: entropy calibration (Migacz, 2017, "8-bit inference with TensorRT"): a 2048-bin
  histogram of ``|x|``; the threshold whose 128-level quantized distribution is closest to
  the clipped reference distribution in KL divergence.

The histogram observers hold a fixed number of bins whatever the number of batches: bin
edges lie on a grid ``k * width`` (0 is always an edge) and when a batch falls outside the
covered range the width is multiplied by a power of two, merging whole bins exactly.
Non-finite values (NaN, +-inf) are ignored. Everything is deterministic.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from nncompress.errors import DataError, RecipeError
from nncompress.quant.affine import QMAX, QMIN
from nncompress.registry import Registry

__all__ = ["OBSERVERS", "Histogram", "HistogramObserver", "KLObserver", "MSEObserver",
           "MinMaxObserver", "Observer", "PercentileObserver", "make_observer"]

_LEVELS = QMAX - QMIN          # 255 steps of an int8 activation


class Observer(ABC):
    """Sees an activation tensor batch after batch; proposes the range its int8 type covers."""

    name: str = ""

    @abstractmethod
    def update(self, x: torch.Tensor) -> None:
        """Take one batch of the activation (any shape, any float dtype)."""

    @abstractmethod
    def range(self) -> tuple[float, float]:
        """``(lo, hi)``, ``lo <= hi``; not necessarily containing 0 (the caller widens).
        Raises DataError when no finite value was ever seen."""


def _finite(x: torch.Tensor) -> torch.Tensor:
    """The finite values of ``x`` as a flat float64 tensor (no gradient)."""
    flat = x.detach().reshape(-1).to(torch.float64)
    finite = torch.isfinite(flat)
    return flat if bool(finite.all()) else flat[finite]


def _check_int(what: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RecipeError(f"observer {what} must be an integer in [{lo}, {hi}], got {value!r}")


def _nothing_seen(name: str) -> DataError:
    return DataError(f"observer {name!r} has seen no finite value; calibrate on at least one "
                     "non-empty batch")


class MinMaxObserver(Observer):
    """The running minimum and maximum of every value seen."""

    name = "minmax"

    def __init__(self) -> None:
        self._lo = math.inf
        self._hi = -math.inf

    def update(self, x: torch.Tensor) -> None:
        values = _finite(x)
        if values.numel():
            self._lo = min(self._lo, float(values.min()))
            self._hi = max(self._hi, float(values.max()))

    def range(self) -> tuple[float, float]:
        if self._lo > self._hi:
            raise _nothing_seen(self.name)
        return self._lo, self._hi


class Histogram:
    """A histogram of ``bins`` counts on the grid ``[start * width, (start + bins) * width]``.

    ``counts[j]`` counts values in ``[(start + j) * width, (start + j + 1) * width)`` (the
    top edge belongs to the last bin). Until two different values were seen it holds one
    value and its count (no width can be chosen from a constant). ``from_zero`` anchors
    the grid at 0 (``start = 0``; for non-negative values such as ``|x|``). Memory is
    ``bins`` int64 counts, whatever the number of batches.
    """

    def __init__(self, bins: int, from_zero: bool = False) -> None:
        self.bins = bins
        self.from_zero = from_zero
        self.counts = torch.zeros(bins, dtype=torch.int64)
        self.width = 0.0              # 0 while no spread was seen
        self.start = 0
        self.lo = math.inf            # exact min / max of the values seen
        self.hi = -math.inf
        self._constant_count = 0      # values equal to self.lo == self.hi before a grid exists

    @property
    def total(self) -> int:
        return int(self.counts.sum()) + self._constant_count

    def add(self, values: torch.Tensor) -> None:
        """Count ``values`` (flat, float64, finite; non-negative if ``from_zero``)."""
        if not values.numel():
            return
        lo = min(float(values.min()), self.lo)
        hi = max(float(values.max()), self.hi)
        if self.width == 0.0 and lo == hi:
            self._constant_count += values.numel()
        else:
            self._cover(lo, hi)
            self._count(values)
        self.lo, self.hi = lo, hi

    def edges(self) -> torch.Tensor:
        """The ``bins + 1`` bin edges, float64."""
        steps = torch.arange(self.start, self.start + self.bins + 1, dtype=torch.float64)
        return steps * self.width

    def _cover(self, lo: float, hi: float) -> None:
        """Make the grid cover ``[lo, hi]``: create it, or widen it by a power of two."""
        if self.width == 0.0:
            self._create(lo, hi)
            return
        if self.start * self.width <= lo and (self.start + self.bins) * self.width >= hi:
            return
        factor = 0                  # 0: the same width, the grid only moves down
        while not self._fits(lo, hi, factor):
            factor += 1
        self._merge(lo, factor)

    def _create(self, lo: float, hi: float) -> None:
        magnitude = max(abs(lo), abs(hi))
        if self.from_zero:
            self.width, self.start = hi / self.bins, 0
        else:   # at least magnitude * 2^-40 wide, so that start stays a small integer
            self.width = max((hi - lo) / (self.bins - 1), magnitude * 2.0**-40)
            self.start = math.floor(lo / self.width)
        if self._constant_count:
            constant = torch.tensor([self.lo], dtype=torch.float64)
            self._count(constant, self._constant_count)
            self._constant_count = 0

    def _start(self, lo: float, factor: int) -> int:
        return min(self.start >> factor, math.floor(lo / (self.width * 2**factor)))

    def _fits(self, lo: float, hi: float, factor: int) -> bool:
        width = self.width * 2**factor
        start = self._start(lo, factor)
        return start * width <= lo and (start + self.bins) * width >= hi

    def _merge(self, lo: float, factor: int) -> None:
        """Multiply the width by ``2**factor`` and start at or below ``lo``: bin ``k``
        (absolute) goes to ``k >> factor`` (bins clamped to the top one are empty: they lie
        above every value seen)."""
        absolute = torch.arange(self.start, self.start + self.bins, dtype=torch.int64)
        merged = torch.bitwise_right_shift(absolute, min(factor, 62))   # floor division
        new_start = self._start(lo, factor)
        counts = torch.zeros(self.bins, dtype=torch.int64)
        counts.index_add_(0, (merged - new_start).clamp(0, self.bins - 1), self.counts)
        self.counts, self.start, self.width = counts, new_start, self.width * 2**factor

    def _count(self, values: torch.Tensor, weight: int = 1) -> None:
        index = torch.floor(values / self.width).to(torch.int64) - self.start
        index = index.clamp(0, self.bins - 1)
        self.counts += torch.bincount(index, minlength=self.bins) * weight

    def quantile(self, q: float) -> float:
        """The ``q``-quantile (``q`` in [0, 1]), linear within a bin, within ``[lo, hi]``."""
        if self.width == 0.0:
            return self.lo
        cdf = torch.cumsum(self.counts, 0).to(torch.float64)
        target = torch.tensor([q * float(cdf[-1])], dtype=torch.float64)
        j = min(int(torch.searchsorted(cdf, target)), self.bins - 1)
        before = float(cdf[j - 1]) if j else 0.0
        inside = float(self.counts[j])
        fraction = (float(target) - before) / inside if inside else 0.0
        value = (self.start + j + fraction) * self.width
        return min(max(value, self.lo), self.hi)


class HistogramObserver(Observer):
    """Base of the observers that keep a :class:`Histogram` of the values (or of ``|x|``)."""

    absolute: bool = False

    def __init__(self, bins: int) -> None:
        _check_int("bins", bins, 16, 1 << 20)
        self.histogram = Histogram(bins, from_zero=self.absolute)
        self._lo = math.inf
        self._hi = -math.inf

    def update(self, x: torch.Tensor) -> None:
        values = _finite(x)
        if not values.numel():
            return
        self._lo = min(self._lo, float(values.min()))
        self._hi = max(self._hi, float(values.max()))
        self.histogram.add(values.abs() if self.absolute else values)

    def range(self) -> tuple[float, float]:
        if self._lo > self._hi:
            raise _nothing_seen(self.name)
        if self.histogram.width == 0.0:      # one value (or one |value|) only
            return self._lo, self._hi
        lo, hi = self._clip()
        return max(lo, self._lo), min(hi, self._hi)

    @abstractmethod
    def _clip(self) -> tuple[float, float]:
        """The proposed range, from a histogram that has a grid."""


class PercentileObserver(HistogramObserver):
    """Clip at the ``percentile``-th and ``(100 - percentile)``-th percentiles, or at the
    ``percentile``-th of ``|x|`` when ``symmetric`` (then ``(-t, t)`` if any value was
    negative, else ``(min, t)``)."""

    name = "percentile"

    def __init__(self, percentile: float = 99.99, symmetric: bool = False,
                 bins: int = 2048) -> None:
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) \
                or not 50.0 < percentile <= 100.0:
            raise RecipeError(f"observer percentile must be in (50, 100], got {percentile!r}")
        self.absolute = bool(symmetric)
        super().__init__(bins)
        self.percentile = float(percentile)

    def _clip(self) -> tuple[float, float]:
        p = self.percentile / 100.0
        if self.absolute:
            t = self.histogram.quantile(p)
            return (-t if self._lo < 0 else self._lo), t
        return self.histogram.quantile(1.0 - p), self.histogram.quantile(p)


def _mse_costs(counts: np.ndarray, centres: np.ndarray, width: float, los: np.ndarray,
               his: np.ndarray) -> np.ndarray:
    """The summed squared int8 quantization error of the histogram for each range
    ``(los[k], his[k])`` (``lo <= 0 <= hi``), quantized as ``activation_qtype`` does. A bin
    narrower than the step contributes its centre's error plus its own spread ``w^2 / 12``;
    a wider bin inside the range contributes rounding noise ``S^2 / 12`` per value."""
    lo, hi = los[:, None], his[:, None]
    scale = np.maximum(hi - lo, 1e-300) / _LEVELS
    zero = np.clip(np.round(QMIN - lo / scale), QMIN, QMAX)
    q = np.clip(np.round(centres[None, :] / scale) + zero, QMIN, QMAX)
    error = (centres[None, :] - (q - zero) * scale) ** 2 + width**2 / 12.0
    inside = (centres[None, :] >= lo) & (centres[None, :] <= hi)
    error = np.where(inside & (width >= scale), scale**2 / 12.0, error)
    cost = (error * counts[None, :]).sum(axis=1)
    return np.where(his > los, cost, np.inf)


class MSEObserver(HistogramObserver):
    """The range minimising the int8 quantization MSE over the histogram (the clipping
    error outside the range traded against the rounding error inside it: Banner, Nahshan &
    Soudry, 2019; the ``mse`` calibrator of NVIDIA's pytorch-quantization, here asymmetric).
    Candidates: 0, up to ``candidates`` bin edges and the exact min / max on each side of 0;
    the pair is found by coordinate descent from the min / max range (each side in turn
    takes its best cut given the other; ``rounds`` at most)."""

    name = "mse"

    def __init__(self, bins: int = 2048, candidates: int = 256, rounds: int = 8) -> None:
        _check_int("candidates", candidates, 1, 4096)
        _check_int("rounds", rounds, 1, 100)
        super().__init__(bins)
        self.candidates = candidates
        self.rounds = rounds

    def _clip(self) -> tuple[float, float]:
        h = self.histogram
        counts = h.counts.to(torch.float64).numpy()
        edges = h.edges().numpy()
        centres = (edges[:-1] + edges[1:]) / 2
        his = self._side(edges, 0.0, self._hi, self._hi)
        los = self._side(edges, self._lo, 0.0, self._lo)
        i, j = 0, len(his) - 1              # los[0] is the min (or 0), his[-1] the max (or 0)
        for _ in range(self.rounds):
            j_new = int(np.argmin(_mse_costs(counts, centres, h.width,
                                             np.full(len(his), los[i]), his)))
            i_new = int(np.argmin(_mse_costs(counts, centres, h.width, los,
                                             np.full(len(los), his[j_new]))))
            if (i_new, j_new) == (i, j):
                break
            i, j = i_new, j_new
        return float(los[i]), float(his[j])

    def _side(self, edges: np.ndarray, lo: float, hi: float, extreme: float) -> np.ndarray:
        """Candidate cuts in ``[lo, hi]`` (one side of 0): 0, bin edges (thinned) and the
        data's ``extreme``; ``[0]`` when no value lies on this side."""
        if hi <= lo:
            return np.array([0.0])
        inner = edges[(edges > lo) & (edges < hi)]
        stride = max(1, math.ceil(len(inner) / self.candidates))
        return np.unique(np.concatenate([inner[::stride], [0.0, extreme]]))


def _smooth(p: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    """Move ``eps`` of mass onto each empty bin (taken evenly from the others), so that
    KL(p || q) is finite (as MXNet's and ONNX Runtime's entropy calibrators do); None if
    ``p`` is all zero."""
    zeros = p == 0
    nonzero = int((~zeros).sum())
    if not nonzero:
        return None
    taken = eps * float(zeros.sum()) / nonzero
    return p + eps * zeros - taken * ~zeros


def _divergence(counts: np.ndarray, tails: np.ndarray, i: int, levels: int) -> float:
    """KL(P || Q) of clipping ``counts`` after ``i`` bins (the tail ``tails[i]`` added to bin
    ``i - 1``) and quantizing them to ``levels`` bins, each spread back evenly over its
    non-empty bins (Migacz, 2017); inf where smoothing cannot make it finite."""
    reference = counts[:i].copy()
    if i < len(counts):
        reference[i - 1] += tails[i]
    group = i // levels
    quantized = counts[:group * levels].reshape(levels, group).sum(axis=1)
    quantized[-1] += counts[group * levels:i].sum()
    mask = reference != 0
    member = np.minimum(np.arange(i) // group, levels - 1)
    used = np.bincount(member, weights=mask, minlength=levels)
    expanded = np.where(mask, quantized[member] / np.maximum(used[member], 1), 0.0)
    p, q = _smooth(reference), _smooth(expanded)
    if p is None or q is None or (q <= 0).any():
        return math.inf
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * np.log(p / q)))


def kl_threshold(counts: np.ndarray, levels: int, coarse: int = 256) -> int:
    """Migacz (2017): the number ``i`` of leading bins of the ``|x|`` histogram ``counts``
    whose clipping quantized to ``levels`` bins loses the least information,
    ``argmin_i KL(P_i || Q_i)`` for ``i`` from ``levels`` to ``len(counts)``: searched on
    at most ``coarse`` evenly spaced ``i`` first, then at every ``i`` around the best."""
    tails = np.cumsum(counts[::-1])[::-1]          # tails[i] = counts[i:].sum()
    top = len(counts)
    stride = max(1, math.ceil((top - levels) / coarse))
    grid = sorted(set(range(levels, top + 1, stride)) | {top})
    best = min(grid, key=lambda i: (_divergence(counts, tails, i, levels), -i))
    near = range(max(levels, best - stride + 1), min(top, best + stride - 1) + 1)
    return min(near, key=lambda i: (_divergence(counts, tails, i, levels), -i))


class KLObserver(HistogramObserver):
    """Entropy calibration (Migacz, 2017): a ``bins``-bin histogram of ``|x|``, the threshold
    ``t`` minimising KL divergence to its ``levels``-level quantization; the range is
    ``(-t, t)`` if any value was negative, else ``(min, t)`` quantized to ``2 * levels``
    levels (all 256 int8 levels are then on one side). As in NVIDIA's pytorch-quantization,
    the first bin counts as the second (a spike at 0, e.g. after a ReLU, would otherwise
    dominate the divergence)."""

    name = "kl"
    absolute = True

    def __init__(self, bins: int = 2048, levels: int = 128) -> None:
        _check_int("levels", levels, 2, 256)
        super().__init__(bins)
        if self.histogram.bins < 2 * levels:
            raise RecipeError(f"observer bins ({bins}) must be at least twice its levels "
                              f"({levels})")
        self.levels = levels

    def _clip(self) -> tuple[float, float]:
        h = self.histogram                                  # of |x|, anchored at 0
        used = int(torch.nonzero(h.counts).max()) + 1      # bins up to the largest |x|
        counts = h.counts[:used].to(torch.float64).numpy()
        counts[0] = counts[min(1, used - 1)]    # ignore the spike at 0 (e.g. after a ReLU)
        levels = self.levels if self._lo < 0 else 2 * self.levels   # unsigned: 256 levels
        # with too few bins there is nothing to clip
        t = h.hi if used <= levels else kl_threshold(counts, levels) * h.width
        return (-t if self._lo < 0 else self._lo), t


ObserverFactory = Callable[..., Observer]

#: name -> observer class (constructor options as keyword arguments).
OBSERVERS: Registry[ObserverFactory] = Registry("observer", error=RecipeError)
for _cls in (MinMaxObserver, PercentileObserver, MSEObserver, KLObserver):
    OBSERVERS.register(_cls.name, _cls)


def make_observer(name: str, **options: Any) -> Observer:
    """A fresh observer ``name`` (see :data:`OBSERVERS`) with its keyword ``options``;
    an unknown name or option raises RecipeError naming it."""
    factory = OBSERVERS.get(name)
    known = inspect.signature(factory).parameters
    for option in options:
        if option not in known:
            raise RecipeError(f"observer {name!r} has no option {option!r}; known: "
                              f"{', '.join(known) or 'none'}")
    return factory(**options)
