"""L1-norm filter pruning (Li, Kadav, Durdanovic, Samet & Graf, 2017).

"Pruning Filters for Efficient ConvNets": score each output unit by the L1 norm of its
filter (``sum |W[j]|`` over the producer rows it owns), physically remove the
lowest-scoring units of every channel group (conv filters ``[C_out, C_in, k...]``, Linear
rows, RNN hidden units with all their gate rows, attention heads, FFN width) together with
the matching consumer columns and norm entries, then fine-tune. Targets: a removed
fraction ``ratio`` (one for all groups, per group, or from a sensitivity analysis) or a
MAC reduction ``macs_reduction``; ``steps > 1`` prunes iteratively with fine-tuning between.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from nncompress import inputs
from nncompress.data import example_input
from nncompress.errors import ModelError
from nncompress.graph import ChannelGroup, channel_groups
from nncompress.measure import count_macs
from nncompress.prune.sensitivity import ratios_for_target, select_groups, sensitivity
from nncompress.prune.structured import (
    group_l1_importance,
    l1_importance,
    plan_for_macs,
    prunable_groups,
    prune_channels,
    rewrite_builtins,
    select_by_ratio,
)
from nncompress.technique import TECHNIQUES, Context, Technique, TechniqueConfig

__all__ = ["L1FilterPruneConfig", "l1_filter_prune", "pick_groups"]

Patterns = Annotated[tuple[str, ...], Field(strict=False)]
Kind = Literal["channels", "hidden", "heads", "cell"]


class L1FilterPruneConfig(TechniqueConfig):
    """Parameters of ``l1_filter_prune``. Give exactly one of ``ratio``/``macs_reduction``.

    - ``ratio``: fraction of units removed, in [0, 1): one float, or ``{group: ratio}``
      (groups not named are left alone); with ``ratios_from="sensitivity"`` it is the
      unit-weighted mean ratio the sensitivity analysis must reach.
    - ``macs_reduction``: e.g. 2.0 = the result has 2x fewer MACs per sample.
    - ``scope``: ``"layer"`` removes the same fraction of every group; ``"global"`` ranks
      all units by L1 score divided by their group's mean.
    - ``steps`` / ``epochs_per_step`` / ``lr``: prune to ``k/steps`` of the target at step
      k, fine-tuning after each step.
    - ``layers`` / ``exclude``: fnmatch patterns over group names; ``kinds``: unit kinds.
    - ``ratios_from="sensitivity"``: per-group ratios from :func:`sensitivity` (at
      ``sensitivity_ratios``, each group pruned alone, no fine-tuning) reaching the target
      with the least sensitive groups pruned most; ``max_drop`` caps one group's drop.
    - ``criterion``: ``"filter"`` (Li et al.: L1 norm of the unit's own filter) or
      ``"group"`` (also the next layer's columns and the BatchNorm scale of the unit; see
      :func:`~nncompress.prune.structured.group_l1_importance`).
    """

    ratio: float | dict[str, float] | None = None
    macs_reduction: float | None = Field(default=None, ge=1.0)
    scope: Literal["layer", "global"] = "layer"
    steps: int = Field(default=1, ge=1, le=100)
    epochs_per_step: int = Field(default=1, ge=0)
    lr: float = Field(default=1e-3, gt=0.0, le=1.0)
    layers: Patterns = ("*",)
    exclude: Patterns = ()
    kinds: Annotated[tuple[Kind, ...], Field(strict=False)] = ("channels", "hidden", "heads",
                                                                "cell")
    ratios_from: Literal["none", "sensitivity"] = "none"
    sensitivity_ratios: Annotated[tuple[float, ...], Field(strict=False)] = (
        0.25, 0.5, 0.75)
    max_drop: float = Field(default=1.0, ge=0.0, le=1.0)
    criterion: Literal["filter", "group"] = "filter"

    @model_validator(mode="after")
    def _one_target(self) -> L1FilterPruneConfig:
        if (self.ratio is None) == (self.macs_reduction is None):
            raise ValueError("give exactly one of ratio and macs_reduction")
        ratios = self.ratio.values() if isinstance(self.ratio, dict) else [self.ratio]
        if any(r is not None and not 0.0 <= r < 1.0 for r in ratios):
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio!r}")
        return self


#: ``criterion`` -> unit importance: ``filter`` is Li et al.'s L1 norm of each unit's
#: producer weights; ``group`` adds the consumer columns and norm scales of the unit.
CRITERIA = {"filter": l1_importance, "group": group_l1_importance}


def pick_groups(model: nn.Module, example: torch.Tensor, config: L1FilterPruneConfig,
                ctx: Context | None = None) -> list[ChannelGroup]:
    """Prunable groups (:func:`prunable_groups`) selected by ``layers``/``exclude``/
    ``kinds``; ModelError when none is left. Groups left alone are noted in ``ctx``."""
    found = prunable_groups(model, example, ctx.note if ctx is not None else None)
    chosen = select_groups(found, config.layers, config.exclude, config.kinds)
    if not chosen:
        raise ModelError(f"layers={list(config.layers)}, exclude={list(config.exclude)}, "
                         f"kinds={list(config.kinds)} leave no channel group; groups: "
                         f"{', '.join(g.name for g in found) or 'none'}")
    return chosen


def _step_keep(model: nn.Module, x: torch.Tensor, config: L1FilterPruneConfig,
               groups: list[ChannelGroup],
               original: dict[str, int], fraction: float, base_macs: int,
               sens_ratios: dict[str, float] | None) -> dict[str, list[int]]:
    importance = CRITERIA[config.criterion]
    scores = {g.name: importance(model, g) for g in groups}
    if config.macs_reduction is not None and sens_ratios is None:
        target = base_macs / config.macs_reduction ** fraction
        now = count_macs(model, inputs.take(x, 1)).total
        if now <= target:
            return {}
        return plan_for_macs(model, x, groups, scores, now / target, config.scope)
    ratio = sens_ratios if sens_ratios is not None else config.ratio
    if isinstance(ratio, dict):
        wanted = {g.name: ratio.get(g.name, 0.0) * fraction for g in groups}
        rel = {n: max(0.0, 1 - original[n] * (1 - r) / s.numel())
               for (n, r), s in zip(wanted.items(), scores.values(), strict=True)}
        return select_by_ratio(scores, rel, "layer")
    total_now = sum(s.numel() for s in scores.values())
    total_keep = sum(original[n] for n in scores) * (1 - ratio * fraction)
    return select_by_ratio(scores, max(0.0, 1 - total_keep / total_now), config.scope)


def l1_filter_prune(model: nn.Module, config: L1FilterPruneConfig, ctx: Context) -> nn.Module:
    """Prune ``model`` in place by L1 filter norm (Li et al., 2017) and fine-tune."""
    model = rewrite_builtins(model, ctx.masks, ctx.note, "l1_filter_prune")
    x = inputs.to(example_input(ctx.data, 2), next(model.parameters()).device)
    groups = pick_groups(model, x, config, ctx)
    original = {g.name: g.size for g in groups}
    if isinstance(config.ratio, dict) and set(config.ratio) - set(original):
        raise ModelError(f"ratio names unknown or unselected group(s) "
                         f"{sorted(set(config.ratio) - set(original))}; selected: "
                         f"{', '.join(original)}")
    base_macs = count_macs(model, inputs.take(x, 1)).total
    sens_ratios = None
    if config.ratios_from == "sensitivity":
        report = sensitivity(model, ctx.data, config.sensitivity_ratios,
                             groups=[g.name for g in groups])
        sens_ratios = ratios_for_target(
            report, mean_ratio=config.ratio if config.macs_reduction is None else None,
            macs_reduction=config.macs_reduction, model=model, example=x,
            max_drop=config.max_drop)
        ctx.note(f"l1_filter_prune sensitivity ratios: {sens_ratios}")
    for step in range(1, config.steps + 1):
        names = set(original)
        groups = [g for g in channel_groups(model, x) if g.name in names]
        keep = _step_keep(model, x, config, groups, original, step / config.steps, base_macs,
                          sens_ratios)
        prune_channels(model, keep, x, groups=groups, masks=ctx.masks)
        sizes = {g.name: g.size for g in channel_groups(model, x) if g.name in names}
        ctx.note(f"l1_filter_prune step {step}/{config.steps}: units {sizes} (from "
                 f"{original}); MACs {count_macs(model, inputs.take(x, 1)).total} "
                 f"(from {base_macs})")
        if config.epochs_per_step > 0:
            ctx.fine_tune(model, epochs=config.epochs_per_step, lr=config.lr,
                          desc=f"l1 prune step {step}/{config.steps}")
    return model


TECHNIQUES.register("l1_filter_prune", Technique(
    name="l1_filter_prune",
    category="pruning",
    paper="Li, Kadav, Durdanovic, Samet & Graf (2017): Pruning filters for efficient "
          "ConvNets",
    summary="Physically remove the conv filters / units / RNN hidden units / attention "
            "heads with the smallest L1 norm (with every consumer), to a ratio or a MAC "
            "target, optionally per-group ratios from a sensitivity analysis; fine-tune.",
    config=L1FilterPruneConfig,
    apply=l1_filter_prune,
))
