"""1-D k-means for weight sharing: initialisations, Lloyd iterations, exact optimum.

Han, Mao & Dally (2015), "Deep compression", cluster the weights of each layer with
k-means (Lloyd, 1982) and compare three initialisations of the ``k`` centroids:

- ``linear``: evenly spaced between the smallest and the largest weight (the paper's
  choice: it keeps the rare large weights, which matter most, as centroids);
- ``density``: the weights' CDF cut into ``k`` equal steps, i.e. the quantiles at
  ``(2i + 1) / (2k)`` (centroids crowd where the weights do);
- ``random``: ``k`` distinct weights drawn at random (Forgy), seeded.

:func:`optimal_kmeans_1d` finds the exact minimum of the within-cluster sum of squares
by dynamic programming over the sorted unique values (Wang & Song, 2011, "Ckmeans.1d.dp"):
``D[m][i] = min_j D[m-1][j] + cost(j, i)``, O(k n^2) time for ``n`` unique values, run
as one vectorised ``[n, n]`` minimum per level. It is affordable only while
``k * n * n <= OPTIMAL_MAX_WORK`` (2**28: e.g. n = 1024 unique values with k = 256, or
n = 4096 with k = 16, about a second on one CPU thread); larger inputs raise
:class:`~nncompress.errors.ConstraintError`.

Every function takes a flat float tensor ``values: [n]`` and returns float tensors on the
CPU; centroids are always sorted ascending, labels are int64 ``[n]`` in ``[0, k)``.
"""

from __future__ import annotations

from typing import Literal

import torch

from nncompress.errors import ConstraintError

__all__ = [
    "INITS",
    "OPTIMAL_MAX_WORK",
    "Init",
    "assign",
    "density_init",
    "init_centroids",
    "kmeans_1d",
    "linear_init",
    "lloyd",
    "optimal_kmeans_1d",
    "random_init",
]

Init = Literal["linear", "density", "random"]
INITS: tuple[str, ...] = ("linear", "density", "random")
#: Largest ``k * n_unique ** 2`` :func:`optimal_kmeans_1d` accepts.
OPTIMAL_MAX_WORK: int = 2**28


def _flat(values: torch.Tensor) -> torch.Tensor:
    flat = values.detach().flatten().to(device="cpu", dtype=torch.float64)
    if flat.numel() == 0:
        raise ConstraintError("k-means needs at least one value, got an empty tensor")
    if not bool(torch.isfinite(flat).all()):
        raise ConstraintError("k-means values must be finite, got NaN or inf")
    return flat


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConstraintError(f"number of clusters k must be a positive integer, got {k!r}")


def linear_init(values: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` centroids evenly spaced over ``[min(values), max(values)]``: ``[k]``."""
    _check_k(k)
    flat = _flat(values)
    return torch.linspace(float(flat.min()), float(flat.max()), k, dtype=torch.float64)


def density_init(values: torch.Tensor, k: int) -> torch.Tensor:
    """The quantiles of ``values`` at ``(2i + 1) / (2k)``, i = 0..k-1: ``[k]``."""
    _check_k(k)
    flat = _flat(values)
    q = (2 * torch.arange(k, dtype=torch.float64) + 1) / (2 * k)
    return torch.quantile(flat, q)


def random_init(values: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """``k`` distinct values drawn at random with ``seed`` (all of them if fewer): sorted."""
    _check_k(k)
    unique = torch.unique(_flat(values))
    if unique.numel() <= k:
        return unique
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(unique.numel(), generator=g)[:k]
    return torch.sort(unique[pick]).values


def init_centroids(values: torch.Tensor, k: int, init: Init = "linear",
                   seed: int = 0) -> torch.Tensor:
    """Initial centroids ``[k]`` (fewer for ``random`` on fewer unique values), sorted."""
    if init == "linear":
        return linear_init(values, k)
    if init == "density":
        return density_init(values, k)
    if init == "random":
        return random_init(values, k, seed)
    raise ConstraintError(f"unknown k-means init {init!r}; known: {', '.join(INITS)}")


def assign(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index ``[n]`` of the nearest of the sorted ``centroids`` for every value."""
    flat = _flat(values)
    cents = centroids.detach().to(dtype=torch.float64, device="cpu")
    if cents.numel() == 1:
        return torch.zeros(flat.numel(), dtype=torch.int64)
    bounds = (cents[1:] + cents[:-1]) / 2
    return torch.searchsorted(bounds, flat)


def lloyd(values: torch.Tensor, centroids: torch.Tensor, *, iters: int = 100,
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd iterations from ``centroids`` until the labels stop changing (or ``iters``).

    An empty cluster keeps its centroid (as with the paper's linear initialisation, whose
    outer centroids may start with few members). Returns ``(centroids [k], labels [n])``.
    """
    flat = _flat(values)
    cents = torch.sort(centroids.detach().to(dtype=torch.float64, device="cpu")).values
    k = cents.numel()
    labels = assign(flat, cents)
    for _ in range(max(iters, 0)):
        counts = torch.bincount(labels, minlength=k).to(torch.float64)
        sums = torch.bincount(labels, weights=flat, minlength=k)
        cents = torch.where(counts > 0, sums / counts.clamp(min=1), cents)
        cents = torch.sort(cents).values
        new = assign(flat, cents)
        if torch.equal(new, labels):
            break
        labels = new
    return cents, labels


def optimal_kmeans_1d(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact 1-D k-means (minimum within-cluster sum of squares) by dynamic programming.

    Clusters of sorted values are contiguous, so with prefix sums over the sorted unique
    values (weighted by multiplicity) ``cost(j, i)`` of one cluster is O(1) and the level
    recursion is a minimum over an ``[n, n]`` matrix. Returns ``(centroids [m], labels
    [n_values])`` with ``m = min(k, n unique)``. Raises ``ConstraintError`` when
    ``k * n_unique**2 > OPTIMAL_MAX_WORK``.
    """
    _check_k(k)
    flat = _flat(values)
    unique, inverse, counts = torch.unique(flat, return_inverse=True, return_counts=True)
    n = unique.numel()
    k = min(k, n)
    if k * n * n > OPTIMAL_MAX_WORK:
        raise ConstraintError(f"optimal k-means on {n} unique values with k={k} needs "
                              f"k*n^2={k * n * n} > {OPTIMAL_MAX_WORK} steps; use Lloyd")
    w = counts.to(torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    cw = torch.cat([zero, torch.cumsum(w, 0)])
    c1 = torch.cat([zero, torch.cumsum(w * unique, 0)])
    c2 = torch.cat([zero, torch.cumsum(w * unique * unique, 0)])
    # cost[j, i]: one cluster holding sorted unique values j..i-1 (j < i), else inf.
    dw = cw[None, :] - cw[:, None]
    d1 = c1[None, :] - c1[:, None]
    cost = (c2[None, :] - c2[:, None]) - d1 * d1 / dw.clamp(min=1e-300)
    cost = torch.where(dw > 0, cost.clamp(min=0.0), torch.full_like(cost, float("inf")))
    best = cost[0]                               # D[1][i] for i = 0..n
    back = torch.zeros(k, n + 1, dtype=torch.int64)
    for level in range(1, k):
        best, back[level] = torch.min(best[:, None] + cost, dim=0)
    starts = [0] * k
    end = n
    for level in range(k - 1, -1, -1):
        start = int(back[level, end]) if level > 0 else 0
        starts[level] = start
        end = start
    bounds = torch.tensor([*starts, n])
    cents = (c1[bounds[1:]] - c1[bounds[:-1]]) / (cw[bounds[1:]] - cw[bounds[:-1]])
    group = torch.repeat_interleave(torch.arange(k), bounds[1:] - bounds[:-1])
    return cents, group[inverse]


def kmeans_1d(values: torch.Tensor, k: int, *, init: Init = "linear",
              method: Literal["lloyd", "optimal"] = "lloyd", iters: int = 100,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster ``values`` into at most ``k`` groups: ``(centroids [m], labels [n])``.

    With at most ``k`` unique values every value is its own centroid (exact). Otherwise
    ``method="lloyd"`` runs :func:`lloyd` from :func:`init_centroids`; ``"optimal"`` runs
    :func:`optimal_kmeans_1d` (``init`` is then unused).
    """
    _check_k(k)
    flat = _flat(values)
    unique, inverse = torch.unique(flat, return_inverse=True)
    if unique.numel() <= k:
        return unique, inverse
    if method == "optimal":
        return optimal_kmeans_1d(flat, k)
    if method != "lloyd":
        raise ConstraintError(f"unknown k-means method {method!r}; known: lloyd, optimal")
    return lloyd(flat, init_centroids(flat, k, init, seed), iters=iters)
