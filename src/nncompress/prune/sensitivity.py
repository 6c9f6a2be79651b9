"""Per-group pruning sensitivity (Li, Kadav, Durdanovic, Samet & Graf, 2017, Sec. 3.2).

Each channel group (see :func:`nncompress.graph.channel_groups`) is pruned alone, without
fine-tuning, at several ratios by L1 filter norm, and the test accuracy is recorded.
:func:`ratios_for_target` then picks one ratio per group: groups whose accuracy holds up
are pruned more. :func:`nncompress.report.plots.plot_sensitivity` draws the curves.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from nncompress import inputs
from nncompress.data import Dataset, example_input
from nncompress.errors import ConstraintError, ModelError
from nncompress.graph import ChannelGroup, channel_groups
from nncompress.measure import count_macs
from nncompress.measure.quality import quality
from nncompress.prune.structured import (
    l1_importance,
    prunable_groups,
    prune_channels,
    select_by_ratio,
)
from nncompress.train import evaluate

__all__ = ["SensitivityReport", "ratios_for_target", "select_groups",
           "sensitivity"]


@dataclass(frozen=True)
class SensitivityReport:
    """``curves[group] = ((ratio, test accuracy), ...)``; ``sizes[group]`` = its units;
    ``baseline`` = unpruned test accuracy (fractions in [0, 1])."""

    baseline: float
    curves: Mapping[str, tuple[tuple[float, float], ...]]
    sizes: Mapping[str, int]


def select_groups(groups: Sequence[ChannelGroup], layers: Sequence[str] = ("*",),
                  exclude: Sequence[str] = (),
                  kinds: Sequence[str] = ("channels", "hidden", "heads")) -> list[ChannelGroup]:
    """Groups whose name matches a ``layers`` pattern, no ``exclude`` pattern, and a kind."""
    return [g for g in groups if g.kind in kinds
            and any(fnmatch.fnmatchcase(g.name, p) for p in layers)
            and not any(fnmatch.fnmatchcase(g.name, p) for p in exclude)]


def sensitivity(model: nn.Module, data: Dataset, ratios: Sequence[float] = (0.25, 0.5, 0.75),
                *, groups: Sequence[str] | None = None) -> SensitivityReport:
    """Test accuracy after L1-pruning each group alone at each ratio (no fine-tuning).

    ``groups``: names to analyse (default all). The model is not changed. On unlabelled
    data the score is the top-1 agreement with the unpruned ``model`` instead (label-free;
    the baseline is then 1.0).
    """
    x = example_input(data, 2)
    found = prunable_groups(model, x)
    if groups is not None:
        missing = sorted(set(groups) - {g.name for g in found})
        if missing:
            raise ModelError(f"unknown channel group(s) {missing}")
        found = [g for g in found if g.name in set(groups)]
    def score_of(m: nn.Module) -> float:
        if data.labelled:
            return evaluate(m, data.test)
        return quality(m, data.test, "agreement", teacher=model)

    baseline = score_of(model)
    curves: dict[str, tuple[tuple[float, float], ...]] = {}
    for group in found:
        score = {group.name: l1_importance(model, group)}
        points = []
        for ratio in ratios:
            trial = prune_channels(copy.deepcopy(model), select_by_ratio(score, ratio), x,
                                   groups=[group])
            points.append((float(ratio), score_of(trial)))
        curves[group.name] = tuple(points)
    return SensitivityReport(baseline, curves, {g.name: g.size for g in found})


def _ratios_at(report: SensitivityReport, drop: float) -> dict[str, float]:
    """Per group: the largest tested ratio whose accuracy drop is <= ``drop``."""
    return {name: max([0.0] + [r for r, acc in points if report.baseline - acc <= drop])
            for name, points in report.curves.items()}


def ratios_for_target(report: SensitivityReport, *, mean_ratio: float | None = None,
                      macs_reduction: float | None = None, model: nn.Module | None = None,
                      example: torch.Tensor | None = None,
                      max_drop: float = 1.0) -> dict[str, float]:
    """Per-group ratios from ``report`` for a global target, least sensitive pruned most.

    Raises the allowed single-group accuracy drop ``t`` step by step (over the measured
    drops, up to ``max_drop``) and gives every group the largest tested ratio whose drop is
    <= t, until the unit-weighted mean ratio reaches ``mean_ratio`` or, with ``model`` and
    ``example``, the L1-pruned model has ``macs_reduction``x fewer MACs. ConstraintError if
    no t <= max_drop reaches the target.
    """
    if (mean_ratio is None) == (macs_reduction is None):
        raise ConstraintError("give exactly one of mean_ratio and macs_reduction")
    if macs_reduction is not None and (model is None or example is None):
        raise ConstraintError("macs_reduction needs model and example")
    drops = sorted({max(0.0, report.baseline - acc) for pts in report.curves.values()
                    for _, acc in pts} | {0.0})
    total = sum(report.sizes.values())
    for drop in (d for d in drops if d <= max_drop):
        ratios = _ratios_at(report, drop)
        if mean_ratio is not None:
            if sum(ratios[n] * report.sizes[n] for n in ratios) / total >= mean_ratio:
                return ratios
        elif _macs_ratio(model, example, ratios) >= macs_reduction:
            return ratios
    raise ConstraintError(f"no per-group ratios within max_drop={max_drop} reach the target "
                          f"(mean_ratio={mean_ratio}, macs_reduction={macs_reduction})")


def _macs_ratio(model: nn.Module, example: torch.Tensor, ratios: Mapping[str, float]) -> float:
    groups = {g.name: g for g in channel_groups(model, example) if g.name in ratios}
    scores = {n: l1_importance(model, groups[n]) for n in ratios}
    trial = prune_channels(copy.deepcopy(model), select_by_ratio(scores, ratios), example,
                           groups=list(groups.values()))
    one = inputs.take(example, 1)
    return count_macs(model, one).total / count_macs(trial, one).total
