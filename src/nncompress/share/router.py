"""Run-time model multiplexing with a learned lightweight router.

Eshratifar & Pedram (2020), "Runtime deep model multiplexing for reduced latency and
energy consumption inference": a small network (the multiplexer) looks at each input and
decides which of several models -- from small to large, e.g. one model and its compressed
versions -- should answer it; only that model runs. Here the router outputs one logit per
model, trained with binary cross-entropy to predict whether that model classifies the
input correctly (targets measured on held-out data the models were not trained on). At
run time an input goes to the cheapest model whose predicted probability of being right
is at least ``threshold``, else to the largest. The threshold is chosen on a calibration
part of the held-out data, so that the average cost per input -- the router's MACs plus
the chosen model's -- stays within a user budget.

Shapes: each model maps ``[B, *input_shape]`` to logits ``[B, classes]``; the router maps
``[B, *input_shape]`` to ``[B, len(models)]``. Costs are MACs per sample.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nncompress import inputs
from nncompress.data import Dataset, example_input
from nncompress.errors import ConstraintError, DataError, ModelError
from nncompress.measure import count_macs
from nncompress.share.multiplex import GRID, ordered_costs, split_loader

__all__ = ["Multiplexer", "RouterPoint", "default_router", "router_curve", "train_router"]


@dataclass(frozen=True)
class RouterPoint:
    """One threshold: accuracy, average MACs per input (router included) and the fraction
    of inputs each model answered."""

    threshold: float
    accuracy: float
    avg_macs: float
    share: tuple[float, ...]


class Multiplexer(nn.Module):
    """``models`` from cheapest to most expensive, a ``router`` and its ``threshold``;
    ``forward`` returns the logits of the model chosen for each input."""

    def __init__(self, models: Sequence[nn.Module], router: nn.Module,
                 threshold: float) -> None:
        super().__init__()
        if len(models) < 2:
            raise ModelError("a multiplexer needs at least two models")
        self.models = nn.ModuleList(models)
        self.router = router
        self.threshold = float(threshold)

    def choose(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the model each input goes to, ``[B]``."""
        return _choice(torch.sigmoid(self.router(x)), self.threshold)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [B, C], index of the answering model [B])``; each model runs only on
        the inputs sent to it."""
        who = self.choose(x)
        out: torch.Tensor | None = None
        for i, model in enumerate(self.models):
            mine = (who == i).nonzero().flatten()
            if len(mine) == 0:
                continue
            logits = inputs.call(model, inputs.select(x, mine))
            if out is None:
                out = logits.new_zeros(inputs.batch_size(x), logits.shape[-1])
            out[mine] = logits
        assert out is not None
        return out, who

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.route(x)[0]


def _choice(p_right: torch.Tensor, threshold: float) -> torch.Tensor:
    """First (cheapest) model with ``p >= threshold``; the last model otherwise."""
    sure = p_right >= threshold
    sure[:, -1] = True
    return sure.float().argmax(dim=1)


def default_router(input_shape: Sequence[int], num_models: int, hidden: int = 32) -> nn.Module:
    """flatten -> Linear(hidden) -> ReLU -> Linear(num_models): a few thousand MACs."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(),
                         nn.Linear(hidden, num_models))


def _collect(models: Sequence[nn.Module], router: nn.Module | None,
             loader: Iterable) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                         torch.Tensor | None]:
    """Inputs ``[N, ...]``, labels ``[N]``, each model's prediction ``[N, M]`` and the
    router's probabilities ``[N, M]`` (``None`` without a router)."""
    xs, ys, preds, probs = [], [], [], []
    with torch.no_grad():
        for x, y in loader:
            xs.append(x)
            ys.append(y)
            preds.append(torch.stack([inputs.call(m, x).argmax(dim=-1) for m in models],
                                     dim=1))
            if router is not None:
                probs.append(torch.sigmoid(router(x)))
    if not ys:
        raise DataError("multiplexer: the loader yields no samples")
    return (torch.cat(xs), torch.cat(ys), torch.cat(preds),
            torch.cat(probs) if router is not None else None)


def _point(p_right: torch.Tensor, right: torch.Tensor, costs: Sequence[float],
           router_macs: int, threshold: float) -> RouterPoint:
    who = _choice(p_right.clone(), threshold)
    correct = right.gather(1, who[:, None]).squeeze(1)
    cost = torch.tensor(costs, dtype=torch.float64)[who] + router_macs
    share = tuple(float((who == i).double().mean()) for i in range(right.shape[1]))
    return RouterPoint(threshold, float(correct.double().mean()), float(cost.mean()), share)


def _costs(models: Sequence[nn.Module], router: nn.Module,
           data: Dataset) -> tuple[list[int], int]:
    """MACs per sample of each model (cheapest first, checked) and of the router."""
    return (ordered_costs(models, data, "multiplexer"),
            count_macs(router, example_input(data, 1)).total)


def _fit_router(router: nn.Module, x: torch.Tensor, right: torch.Tensor, *, epochs: int,
                lr: float, batch: int, seed: int) -> None:
    """BCE on "model i is right on this input" targets ``[N, M]``."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(router.parameters(), lr=lr)
    router.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch):
            idx = order[start:start + batch]
            optimizer.zero_grad(set_to_none=True)
            loss = F.binary_cross_entropy_with_logits(router(x[idx]), right[idx].float())
            loss.backward()
            optimizer.step()
    router.eval()


def train_router(models: Sequence[nn.Module], data: Dataset, held_out: Iterable, *,
                 budget_macs: float, router: nn.Module | None = None, epochs: int = 60,
                 lr: float = 3e-3, fit_fraction: float = 0.7,
                 seed: int = 0) -> Multiplexer:
    """Train a router on ``held_out`` (samples the models did not see) and pick the
    threshold for ``budget_macs`` average MACs per input (router included).

    ``fit_fraction`` of the held-out samples (a seeded random choice) train the router;
    the rest calibrate the threshold: the most accurate of :data:`GRID` within budget.
    ``router`` defaults to :func:`default_router`. Models must be cheapest first.
    """
    if not 0.0 < fit_fraction < 1.0:
        raise ValueError(f"fit_fraction must be in (0, 1), got {fit_fraction!r}")
    for m in models:
        m.eval()
    if router is None:
        torch.manual_seed(seed)  # the router's initial weights depend on the seed only
        router = default_router(data.input_shape, len(models))
    costs, router_macs = _costs(models, router, data)
    if budget_macs < costs[0] + router_macs:
        raise ConstraintError(f"budget of {budget_macs:.0f} MACs per sample is below the "
                              f"router ({router_macs}) plus the cheapest model ({costs[0]})")
    x, y, preds, _ = _collect(models, None, held_out)
    right = preds == y[:, None]
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = round(len(y) * fit_fraction)
    if cut < 1 or cut >= len(y):
        raise DataError(f"multiplexer: {len(y)} held-out samples are too few to split "
                        f"{fit_fraction:.0%} / {1 - fit_fraction:.0%}")
    fit_idx, cal_idx = order[:cut], order[cut:]
    _fit_router(router, x[fit_idx], right[fit_idx], epochs=epochs, lr=lr, batch=64, seed=seed)
    with torch.no_grad():
        p_cal = torch.sigmoid(router(x[cal_idx]))
    points = [_point(p_cal, right[cal_idx], costs, router_macs, t) for t in GRID]
    # threshold 0 sends everything to the cheapest model, within budget (checked above)
    within = [p for p in points if p.avg_macs <= budget_macs]
    best = max(within, key=lambda p: (p.accuracy, -p.avg_macs))
    return Multiplexer(models, router, best.threshold)


def router_curve(mux: Multiplexer, data: Dataset, *,
                 split: str | Iterable = "test") -> list[RouterPoint]:
    """The multiplexer's router evaluated at every threshold of :data:`GRID` on ``split``
    (``"test"``, ``"train"`` or a loader), sorted by cost."""
    _, y, preds, probs = _collect(list(mux.models), mux.router, split_loader(data, split))
    assert probs is not None
    costs, router_macs = _costs(list(mux.models), mux.router, data)
    right = preds == y[:, None]
    points = [_point(probs, right, costs, router_macs, t) for t in GRID]
    return sorted(points, key=lambda p: (p.avg_macs, -p.accuracy))
