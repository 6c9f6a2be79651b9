"""1-D k-means for weight sharing: initialisations, Lloyd, the exact DP optimum."""

from __future__ import annotations

import itertools

import pytest
import torch

from nncompress.errors import ConstraintError
from nncompress.share import kmeans
from nncompress.share.kmeans import (
    assign,
    density_init,
    init_centroids,
    kmeans_1d,
    linear_init,
    lloyd,
    optimal_kmeans_1d,
    random_init,
)


def values(n: int = 500, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def sse(v: torch.Tensor, cents: torch.Tensor, labels: torch.Tensor) -> float:
    return float(((v.double() - cents.double()[labels]) ** 2).sum())


def brute_force_sse(v: torch.Tensor, k: int) -> float:
    """Minimum SSE over every labelling of ``v`` into exactly ``k`` non-empty clusters."""
    best = float("inf")
    for labels in itertools.product(range(k), repeat=v.numel()):
        lab = torch.tensor(labels)
        if lab.unique().numel() < k:
            continue
        cents = torch.stack([v.double()[lab == m].mean() for m in range(k)])
        best = min(best, sse(v, cents, lab))
    return best


def test_linear_init_spans_min_to_max_evenly() -> None:
    v = torch.tensor([-2.0, 0.5, 1.0, 6.0])
    assert torch.allclose(linear_init(v, 5), torch.tensor([-2.0, 0.0, 2.0, 4.0, 6.0],
                                                          dtype=torch.float64))


def test_density_init_is_cdf_quantiles() -> None:
    v = torch.arange(1000, dtype=torch.float32)             # uniform 0..999
    cents = density_init(v, 4)
    assert torch.allclose(cents, torch.tensor([124.875, 374.625, 624.375, 874.125],
                                              dtype=torch.float64))
    # Density puts every centroid where 90 % of these values lie; linear spacing one.
    skewed = torch.cat([torch.zeros(900) + torch.linspace(0, 1, 900), torch.tensor([50.0] * 100)])
    assert int((density_init(skewed, 4) <= 1.0).sum()) == 4
    assert int((linear_init(skewed, 4) <= 1.0).sum()) == 1


def test_random_init_is_seeded_and_draws_existing_values() -> None:
    v = values()
    a, b, c = random_init(v, 8, seed=1), random_init(v, 8, seed=1), random_init(v, 8, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.numel() == 8 and torch.all(a[1:] > a[:-1])
    assert all(bool((v.double() == x).any()) for x in a)


def test_lloyd_reaches_a_fixed_point() -> None:
    v = values()
    cents, labels = lloyd(v, linear_init(v, 8))
    assert torch.equal(labels, assign(v, cents))             # every value at its nearest
    for m in range(8):
        members = v.double()[labels == m]
        if members.numel():
            assert float(members.mean()) == pytest.approx(float(cents[m]), abs=1e-12)
    assert sse(v, cents, labels) < sse(v, linear_init(v, 8), assign(v, linear_init(v, 8)))


def test_few_unique_values_are_kept_exactly() -> None:
    v = torch.tensor([0.5, -1.0, 0.5, 2.0, -1.0])
    cents, labels = kmeans_1d(v, 4)
    assert torch.equal(cents[labels].float(), v)


@pytest.mark.parametrize("seed", range(4))
def test_optimal_matches_brute_force(seed: int) -> None:
    v = values(8, seed)
    cents, labels = optimal_kmeans_1d(v, 3)
    assert sse(v, cents, labels) == pytest.approx(brute_force_sse(v, 3), abs=1e-9)
    assert torch.all(cents[1:] > cents[:-1])


@pytest.mark.parametrize("init", ["linear", "density", "random"])
def test_optimal_is_never_worse_than_lloyd(init: str) -> None:
    v = values(300)
    opt = sse(v, *optimal_kmeans_1d(v, 16))
    assert opt <= sse(v, *kmeans_1d(v, 16, init=init)) + 1e-9  # type: ignore[arg-type]
    assert opt == pytest.approx(sse(v, *kmeans_1d(v, 16, method="optimal")))


def test_optimal_handles_repeated_values_and_refuses_large_inputs(monkeypatch) -> None:
    v = torch.tensor([1.0, 1.0, 1.0, 5.0, 9.0, 9.0])
    cents, labels = optimal_kmeans_1d(v, 2)
    # {1,1,1} | {5,9,9}: SSE 0 + 2*(4/3)^2 + (8/3)^2 = 10.67 < 12 of {1,1,1,5} | {9,9}.
    assert torch.allclose(cents, torch.tensor([1.0, 23 / 3], dtype=torch.float64))
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    monkeypatch.setattr(kmeans, "OPTIMAL_MAX_WORK", 100)
    with pytest.raises(ConstraintError, match="k=4"):
        optimal_kmeans_1d(values(50), 4)


def test_bad_inputs_raise_constraint_errors() -> None:
    with pytest.raises(ConstraintError, match="0"):
        linear_init(values(), 0)
    with pytest.raises(ConstraintError, match="empty"):
        kmeans_1d(torch.tensor([]), 4)
    with pytest.raises(ConstraintError, match="finite"):
        kmeans_1d(torch.tensor([1.0, float("nan")]), 1)
    with pytest.raises(ConstraintError, match="'kmeans\\+\\+'"):
        init_centroids(values(), 4, "kmeans++")  # type: ignore[arg-type]
