"""Run-time model multiplexing by a confidence cascade.

Eshratifar & Pedram (2020), "Runtime deep model multiplexing for reduced latency and
energy consumption inference": keep several models of one task, from small to large (for
instance a model and its compressed versions), and send each input to the cheapest one
expected to be right. This module implements the cascade form: each input goes to the
smallest model first; if that model's top softmax probability is below the model's
threshold, the input moves on to the next larger model, and the largest model answers
whatever is left. Thresholds are chosen on calibration data -- a held-out split the
models were not trained on (:func:`nncompress.data.holdout`); models that fit their
training data look sure of every training input -- so that the average cost per input
stays within a user budget while accuracy is as high as possible. The learned-router
form is in :mod:`nncompress.share.router`.

Shapes: every model maps ``[B, *input_shape]`` to logits ``[B, classes]``; costs are MACs
per sample (:func:`nncompress.measure.count_macs`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from nncompress import inputs
from nncompress.data import Dataset, example_input
from nncompress.errors import ConstraintError, ModelError
from nncompress.inputs import Inputs
from nncompress.inputs import packed as _packed
from nncompress.measure import count_macs

__all__ = ["Cascade", "CascadePoint", "calibrate_cascade", "cascade_curve",
           "evaluate_thresholds", "ordered_costs", "split_loader"]

#: candidate confidence thresholds tried per stage when calibrating
GRID = (0.0, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 0.995, 1.01)


@dataclass(frozen=True)
class CascadePoint:
    """One operating point: thresholds, accuracy and average MACs per sample, and the
    fraction of inputs each model answered."""

    thresholds: tuple[float, ...]
    accuracy: float
    avg_macs: float
    share: tuple[float, ...]


class Cascade(nn.Module):
    """Models from cheapest to most expensive, with one confidence threshold per model but
    the last; ``forward`` returns the logits of the model that answered each input."""

    def __init__(self, models: Sequence[nn.Module], thresholds: Sequence[float]) -> None:
        super().__init__()
        if len(models) < 2:
            raise ModelError("a cascade needs at least two models")
        if len(thresholds) != len(models) - 1:
            raise ModelError(f"a cascade of {len(models)} models needs {len(models) - 1} "
                             f"thresholds, got {len(thresholds)}")
        self.models = nn.ModuleList(models)
        self.thresholds = tuple(float(t) for t in thresholds)

    def route(self, x: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [B, C], index of the answering model [B])``."""
        out: torch.Tensor | None = None
        n = inputs.batch_size(x)
        who = torch.full((n,), len(self.models) - 1, dtype=torch.long)
        pending = torch.arange(n)
        for i, model in enumerate(self.models):
            logits = inputs.call(model, inputs.select(x, pending))
            if out is None:
                out = logits.new_zeros(n, logits.shape[-1])
            if i == len(self.models) - 1:
                out[pending] = logits
                break
            sure = logits.softmax(dim=-1).amax(dim=-1) >= self.thresholds[i]
            out[pending[sure]] = logits[sure]
            who[pending[sure]] = i
            pending = pending[~sure]
            if len(pending) == 0:
                break
        assert out is not None
        return out, who

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        return self.route(_packed(args, kwargs))[0]


def _probabilities(models: Sequence[nn.Module], loader) -> tuple[list[torch.Tensor],
                                                               torch.Tensor]:
    """Softmax outputs ``[N, C]`` of every model on ``loader``, and the labels ``[N]``."""
    probs: list[list[torch.Tensor]] = [[] for _ in models]
    labels: list[torch.Tensor] = []
    with torch.no_grad():
        for m in models:
            m.eval()
        for x, y in loader:
            for i, m in enumerate(models):
                probs[i].append(inputs.call(m, x).softmax(dim=-1))
            labels.append(y)
    return [torch.cat(p) for p in probs], torch.cat(labels)


def split_loader(data: Dataset, split: str | Iterable) -> Iterable:
    """``"test"``, ``"train"`` or a loader of ``(x, y)`` batches."""
    if isinstance(split, str):
        if split not in ("test", "train"):
            raise ValueError(f"split must be 'test', 'train' or a loader, got {split!r}")
        return data.test if split == "test" else data.train
    return split


def _evaluate(probs: Sequence[torch.Tensor], labels: torch.Tensor, costs: Sequence[int],
              thresholds: Sequence[float]) -> CascadePoint:
    n = len(labels)
    answered = torch.zeros(n, dtype=torch.bool)
    correct = 0
    total_cost = 0.0
    share = []
    for i, p in enumerate(probs):
        live = ~answered
        total_cost += costs[i] * int(live.sum())  # every live input runs this model
        take = live if i == len(probs) - 1 else live & (p.amax(dim=-1) >= thresholds[i])
        correct += int((p[take].argmax(dim=-1) == labels[take]).sum())
        share.append(float(take.sum()) / n)
        answered |= take
    return CascadePoint(tuple(thresholds), correct / n, total_cost / n, tuple(share))


def _costs(models: Sequence[nn.Module], data: Dataset) -> list[int]:
    x = example_input(data, 1)
    return [count_macs(m, x).total for m in models]


def ordered_costs(models: Sequence[nn.Module], data: Dataset, what: str) -> list[int]:
    """MACs per sample of each model, which must come cheapest first (``what`` names the
    multiplexer in the error)."""
    costs = _costs(models, data)
    if costs != sorted(costs):
        raise ModelError(f"order the {what}'s models from cheapest to most expensive; "
                         f"MACs per sample: {costs}")
    return costs


def evaluate_thresholds(models: Sequence[nn.Module], data: Dataset,
                        thresholds: Sequence[float], *,
                        split: str | Iterable = "test") -> CascadePoint:
    """Accuracy, average MACs and per-model share of one cascade setting on ``split``
    (``"test"``, ``"train"`` or a loader)."""
    probs, labels = _probabilities(models, split_loader(data, split))
    return _evaluate(probs, labels, _costs(models, data), thresholds)


def cascade_curve(models: Sequence[nn.Module], data: Dataset, *,
                  split: str | Iterable = "test") -> list[CascadePoint]:
    """Every threshold combination of :data:`GRID` evaluated on ``data``'s ``split``,
    reduced to the Pareto front (no other point is both cheaper and more accurate)."""
    probs, labels = _probabilities(models, split_loader(data, split))
    costs = _costs(models, data)
    points = [_evaluate(probs, labels, costs, t)
              for t in itertools.product(GRID, repeat=len(models) - 1)]
    points.sort(key=lambda p: (p.avg_macs, -p.accuracy))
    front: list[CascadePoint] = []
    for p in points:
        if not front or p.accuracy > front[-1].accuracy:
            front.append(p)
    return front


def calibrate_cascade(models: Sequence[nn.Module], data: Dataset, *, budget_macs: float,
                      calibration: Iterable | None = None) -> Cascade:
    """The most accurate cascade on ``calibration`` (a held-out loader; ``None`` uses the
    training split, which over-trusts the small models) whose average MACs per sample is
    within ``budget_macs`` (models must be ordered from cheapest to most expensive)."""
    costs = ordered_costs(models, data, "cascade")
    if budget_macs < costs[0]:
        raise ConstraintError(f"budget of {budget_macs:.0f} MACs per sample is below the "
                              f"cheapest model's {costs[0]}")
    on = "train" if calibration is None else calibration
    within = [p for p in cascade_curve(models, data, split=on)
              if p.avg_macs <= budget_macs]
    best = max(within, key=lambda p: (p.accuracy, -p.avg_macs))
    return Cascade(models, best.thresholds)
