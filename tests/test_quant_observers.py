"""Calibration observers (minmax, percentile, mse, kl: Migacz 2017): sensible ranges,
batch-wise equals whole, bounded memory, degenerate tensors."""

from __future__ import annotations

import math

import pytest
import torch

from nncompress.errors import DataError, RecipeError
from nncompress.quant import affine
from nncompress.quant.observers import OBSERVERS, Histogram, kl_threshold, make_observer

NAMES = ("kl", "minmax", "mse", "percentile")


def quant_mse(x: torch.Tensor, lo: float, hi: float) -> float:
    """Mean squared error of int8 quantize -> dequantize of ``x`` over ``[lo, hi]``."""
    qt = affine.activation_qtype(lo, hi)
    q = affine.quantize_tensor(x, qt.scale, qt.zero_point)
    return float(((q - qt.zero_point).double() * qt.scale - x.double()).pow(2).mean())


def observed(name: str, x: torch.Tensor, batches: int = 10, **options: object) -> tuple:
    observer = make_observer(name, **options)
    for part in x.chunk(batches):
        observer.update(part)
    return observer.range()


@pytest.fixture(scope="module")
def laplace() -> torch.Tensor:
    """A heavy-tailed (Laplace) activation: 100k values, tails to about +-12."""
    g = torch.Generator().manual_seed(0)
    u = torch.rand(100_000, generator=g, dtype=torch.float64) - 0.5
    return (-torch.sign(u) * torch.log1p(-2 * u.abs())).float()


def test_registry_names_and_errors() -> None:
    assert OBSERVERS.names() == NAMES
    with pytest.raises(RecipeError, match="unknown observer 'median'") as err:
        make_observer("median")
    assert "\n" not in str(err.value)
    with pytest.raises(RecipeError, match="no option 'pct'"):
        make_observer("percentile", pct=99.0)
    with pytest.raises(RecipeError, match="percentile"):
        make_observer("percentile", percentile=20.0)
    with pytest.raises(RecipeError, match="bins"):
        make_observer("mse", bins=3)
    with pytest.raises(RecipeError, match="levels"):
        make_observer("kl", levels=1)
    with pytest.raises(RecipeError, match="twice"):
        make_observer("kl", bins=128, levels=128)


def test_minmax_is_exact_and_batches_equal_whole() -> None:
    x = torch.randn(5000, generator=torch.Generator().manual_seed(1)) * 3 + 1
    whole = make_observer("minmax")
    whole.update(x)
    assert whole.range() == (float(x.min()), float(x.max()))
    assert observed("minmax", x, batches=37) == whole.range()
    assert observed("minmax", x.reshape(50, 100), batches=7) == whole.range()


def test_percentile_clips_a_planted_outlier() -> None:
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(2))
    x[123] = 1000.0
    lo, hi = observed("percentile", x, percentile=99.99)
    assert 3.0 < hi < 6.0 and -6.0 < lo < -3.0
    lo, hi = observed("percentile", x, percentile=99.9, symmetric=True)
    assert lo == -hi and 2.5 < hi < 4.5
    # the 100th percentile is the maximum
    assert observed("percentile", x, percentile=100.0)[1] == pytest.approx(1000.0)


def test_percentile_matches_the_exact_quantile() -> None:
    x = torch.rand(200_000, generator=torch.Generator().manual_seed(3)) * 10 - 2
    lo, hi = observed("percentile", x, percentile=99.0)
    assert lo == pytest.approx(float(torch.quantile(x, 0.01)), abs=0.05)
    assert hi == pytest.approx(float(torch.quantile(x, 0.99)), abs=0.05)


@pytest.mark.parametrize("name", ["mse", "kl"])
def test_clipping_beats_minmax_on_a_heavy_tail(name: str, laplace: torch.Tensor) -> None:
    lo_mm, hi_mm = observed("minmax", laplace)
    lo, hi = observed(name, laplace)
    assert hi < hi_mm and lo > lo_mm                    # the long tails are clipped
    assert hi > 5.0 and lo < -5.0                       # but not the bulk
    margin = {"mse": 0.9, "kl": 1.0}[name]          # mse minimises exactly this error
    assert quant_mse(laplace, lo, hi) < margin * quant_mse(laplace, lo_mm, hi_mm)


@pytest.mark.parametrize("name", ["mse", "kl"])
def test_clipping_of_a_relu_output(name: str, laplace: torch.Tensor) -> None:
    """A spike at 0 (half the values) does not drag the range down to it."""
    x = torch.relu(laplace)
    lo, hi = observed(name, x)
    assert lo == 0.0 and 5.0 < hi <= float(x.max())
    assert quant_mse(x, lo, hi) < 3 * quant_mse(x, 0.0, float(x.max()))


def test_mse_range_is_near_the_best_clip(laplace: torch.Tensor) -> None:
    """Against a brute-force search of symmetric clips: within 5% of the best error."""
    lo, hi = observed("mse", laplace)
    best = min(quant_mse(laplace, -t, t) for t in torch.linspace(2, 13, 45).tolist())
    assert quant_mse(laplace, lo, hi) <= 1.05 * best


def test_histogram_memory_is_bounded_and_counts_exact() -> None:
    """100 batches of growing scale: the histogram keeps its bins, loses no value, and equals
    a direct count of all values on its final grid."""
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(1000, generator=g, dtype=torch.float64) * (1 + k) ** 1.5 + k / 10
               for k in range(100)]
    for name in ("percentile", "mse", "kl"):
        observer = make_observer(name, bins=512)
        for b in batches:
            observer.update(b)
        h = observer.histogram
        assert h.counts.shape == (512,) and h.total == 100_000
        assert all(math.isfinite(v) for v in observer.range())
    h = Histogram(512)
    for b in batches:
        h.add(b)
    everything = torch.cat(batches)
    index = torch.floor(everything / h.width).long() - h.start
    assert index.min() >= 0 and index.max() <= 512          # 512: exactly the top edge
    assert torch.equal(h.counts, torch.bincount(index.clamp(0, 511), minlength=512))
    assert h.edges()[0] <= everything.min() and h.edges()[-1] >= everything.max()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("value", [0.0, 2.5, -7.0])
def test_constant_tensor_does_not_crash(name: str, value: float) -> None:
    lo, hi = observed(name, torch.full((4, 100), value), batches=3)
    assert lo == hi == value
    assert affine.activation_qtype(lo, hi).scale > 0


@pytest.mark.parametrize("name", NAMES)
def test_constant_then_spread(name: str) -> None:
    observer = make_observer(name)
    observer.update(torch.zeros(1000))
    observer.update(torch.linspace(-1.0, 3.0, 1000))
    lo, hi = observer.range()
    assert -1.0 <= lo <= 0.0 and 1.0 < hi <= 3.0
    if name != "minmax":
        assert observer.histogram.total == 2000


@pytest.mark.parametrize("name", NAMES)
def test_nothing_seen_and_non_finite(name: str) -> None:
    observer = make_observer(name)
    observer.update(torch.empty(0))
    observer.update(torch.tensor([float("nan"), float("inf")]))
    with pytest.raises(DataError, match=name):
        observer.range()
    observer.update(torch.tensor([1.0, float("-inf"), -2.0, float("nan")]))
    lo, hi = observer.range()
    assert lo >= -2.0 and hi <= 1.0 and math.isfinite(lo + hi)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic(name: str, laplace: torch.Tensor) -> None:
    assert observed(name, laplace) == observed(name, laplace)


def test_kl_threshold_keeps_a_uniform_distribution_whole() -> None:
    """Nothing to clip in a uniform histogram: the threshold is (near) the last bin."""
    counts = torch.full((1024,), 100.0).numpy()
    assert kl_threshold(counts, 128) >= 1000
