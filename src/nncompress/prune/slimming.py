"""Network slimming (Liu, Li, Shen, Huang, Yan & Zhang, 2017).

"Learning Efficient Convolutional Networks through Network Slimming": train with an L1
penalty ``penalty * sum |gamma|`` on every BatchNorm scale ``gamma`` (``[C]`` per BN) so
that unimportant channels' scales go to zero, then remove the channels whose |gamma| is
below one global threshold (chosen to reach ``ratio`` of the BN-carrying units, or a
``macs_reduction``), physically (with their producers, consumers and norms), then
fine-tune.

Slimming is defined for BatchNorm networks: only channel groups that carry a BatchNorm are
pruned (cnn1d, rescnn; the score of a group with several BNs -- the residual stream -- is
the mean |gamma| over them). A model with no such group (mlp, cnn2d, gru, lstm,
transformer) raises :class:`UnsupportedLayerError` naming its groups; groups without a BN
in a model that has some are left alone and logged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

import torch
from pydantic import Field, model_validator
from torch import nn

from nncompress import inputs, train
from nncompress.data import example_input
from nncompress.errors import UnsupportedLayerError
from nncompress.graph import ChannelGroup
from nncompress.measure import count_macs
from nncompress.prune.masks import apply_masks
from nncompress.prune.sensitivity import select_groups
from nncompress.prune.structured import (
    plan_for_macs,
    prunable_groups,
    prune_channels,
    rewrite_builtins,
)
from nncompress.technique import TECHNIQUES, Context, Technique, TechniqueConfig

__all__ = ["NetworkSlimmingConfig", "bn_penalty", "gamma_scores", "network_slimming"]

BN = (nn.BatchNorm1d, nn.BatchNorm2d)
Patterns = Annotated[tuple[str, ...], Field(strict=False)]


class NetworkSlimmingConfig(TechniqueConfig):
    """Parameters of ``network_slimming``. Give exactly one of ``ratio``/``macs_reduction``.

    - ``penalty``: L1 weight on BN scales during sparsity training (paper: 1e-4 .. 1e-5).
    - ``epochs`` / ``lr``: sparsity-training run before pruning (0: prune the given model).
    - ``ratio``: fraction of the BN-carrying units removed under one global |gamma|
      threshold; ``macs_reduction``: MAC target instead.
    - ``epochs_after`` / ``lr_after``: fine-tuning after the removal.
    - ``layers`` / ``exclude``: fnmatch patterns over group names.
    """

    penalty: float = Field(default=1e-4, ge=0.0, le=1.0)
    epochs: int = Field(default=3, ge=0)
    lr: float = Field(default=1e-3, gt=0.0, le=1.0)
    ratio: float | None = Field(default=None, ge=0.0, lt=1.0)
    macs_reduction: float | None = Field(default=None, ge=1.0)
    epochs_after: int = Field(default=2, ge=0)
    lr_after: float = Field(default=1e-3, gt=0.0, le=1.0)
    layers: Patterns = ("*",)
    exclude: Patterns = ()

    @model_validator(mode="after")
    def _one_target(self) -> NetworkSlimmingConfig:
        if (self.ratio is None) == (self.macs_reduction is None):
            raise ValueError("give exactly one of ratio and macs_reduction")
        return self


def bn_penalty(model: nn.Module, weight: float) -> torch.Tensor:
    """``weight * sum |gamma|`` over every BatchNorm scale of ``model`` (a scalar)."""
    terms = [m.weight.abs().sum() for m in model.modules() if isinstance(m, BN)
             and m.weight is not None]
    return weight * torch.stack(terms).sum() if terms else torch.zeros(())


def gamma_scores(model: nn.Module, groups: list[ChannelGroup]) -> dict[str, torch.Tensor]:
    """``{group: [size]}`` mean |gamma| per unit over the group's BatchNorm entries (a unit
    may own several entries, e.g. both directions of a bidirectional RNN)."""
    modules = dict(model.named_modules())
    out = {}
    for g in groups:
        per_norm = []
        for n in g.norms:
            if not isinstance(modules[n], BN):
                continue
            gamma = modules[n].weight.detach().abs().float().cpu()
            per_norm.append(torch.stack([gamma[list(u)].mean() for u in g.units(n, "norm")]))
        out[g.name] = torch.stack(per_norm).mean(dim=0)
    return out


def _bn_groups(model: nn.Module, x: torch.Tensor, config: NetworkSlimmingConfig,
               ctx: Context) -> list[ChannelGroup]:
    modules = dict(model.named_modules())
    found = select_groups(prunable_groups(model, x, ctx.note), config.layers, config.exclude)
    with_bn = [g for g in found if any(isinstance(modules[n], BN) for n in g.norms)]
    if not with_bn:
        raise UnsupportedLayerError(
            f"network_slimming needs BatchNorm scales; no selected channel group of "
            f"{type(model).__name__} has one: {', '.join(g.name for g in found) or 'none'}")
    for g in found:
        if g not in with_bn:
            ctx.note(f"network_slimming: group {g.name} has no BatchNorm, not pruned")
    return with_bn


def network_slimming(model: nn.Module, config: NetworkSlimmingConfig,
                     ctx: Context) -> nn.Module:
    """Sparsity-train, threshold |gamma| globally, remove channels, fine-tune (in place)."""
    model = rewrite_builtins(model, ctx.masks, ctx.note, "network_slimming")
    x = inputs.to(example_input(ctx.data, 2), next(model.parameters()).device)
    groups = _bn_groups(model, x, config, ctx)
    if config.epochs > 0:
        masks = ctx.masks
        train.fine_tune(model, ctx.data, epochs=config.epochs, lr=config.lr, seed=ctx.seed,
                        progress=ctx.progress, desc="slimming sparsity training",
                        after_step=(lambda m: apply_masks(m, masks)) if masks else None,
                        extra_loss=lambda m: bn_penalty(m, config.penalty),
                        **ctx.train_options())
    scores = gamma_scores(model, groups)
    base = count_macs(model, inputs.take(x, 1)).total
    if config.macs_reduction is not None:
        keep = plan_for_macs(model, x, groups, scores, config.macs_reduction,
                             select=_threshold_keep)
    else:
        keep = _threshold_keep(scores, config.ratio)
    prune_channels(model, keep, x, groups=groups, masks=ctx.masks)
    ctx.note(f"network_slimming: kept {sum(map(len, keep.values()))} of "
             f"{sum(s.numel() for s in scores.values())} BN channels; MACs "
             f"{count_macs(model, inputs.take(x, 1)).total} (from {base})")
    if config.epochs_after > 0:
        ctx.fine_tune(model, epochs=config.epochs_after, lr=config.lr_after,
                      desc="slimming fine-tune")
    return model


def _threshold_keep(scores: Mapping[str, torch.Tensor], ratio: float) -> dict[str, list[int]]:
    """One global |gamma| threshold removing ``ratio`` of all units (>= 1 kept per group)."""
    flat = torch.cat(list(scores.values()))
    n_drop = round(ratio * flat.numel())
    if n_drop == 0:
        return {n: list(range(s.numel())) for n, s in scores.items()}
    threshold = torch.sort(flat).values[n_drop - 1]
    keep = {}
    for name, s in scores.items():
        idx = torch.nonzero(s > threshold).flatten().tolist()
        keep[name] = idx or [int(torch.argmax(s))]
    return keep


TECHNIQUES.register("network_slimming", Technique(
    name="network_slimming",
    category="pruning",
    paper="Liu, Li, Shen, Huang, Yan & Zhang (2017): Learning efficient convolutional "
          "networks through network slimming",
    summary="Train with an L1 penalty on BatchNorm scales, remove the channels whose scale "
            "falls under one global threshold (to a ratio or a MAC target), fine-tune.",
    config=NetworkSlimmingConfig,
    apply=network_slimming,
))
