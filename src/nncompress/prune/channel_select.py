"""Channel pruning driven by the next layer's sampled inputs, with reconstruction.

Two registered techniques share one driver and differ in how they choose channels and
repair the consumer (the maths is in :mod:`nncompress.prune.reconstruct`):

- ``channel_lasso``: He, Zhang & Sun (2017), "Channel pruning for accelerating very deep
  neural networks" -- LASSO channel selection, then least-squares refit of the consumer's
  weights against the *unpruned* model's outputs.
- ``thinet``: Luo, Wu & Lin (2017), "ThiNet: a filter level pruning method for deep neural
  network compression" -- greedy selection by the next layer's statistics, then
  least-squares scaling of the kept channels.

Groups are pruned one at a time in model order, each from features sampled on the
current (already partly pruned) model, with targets from the original model, as the
papers do to stop errors from piling up. A group is eligible when its only consumer is a
Linear or an ungrouped Conv1d/Conv2d -- channels, attention heads (the consumer is the
output projection, each head a block of ``head_dim`` columns) and the last recurrent
layer's hidden units (the consumer is the classifier). Others (a hidden layer feeding
another RNN, the residual stream read by several layers) are named in the run's log and
pruned by the L1 criterion or left untouched, as ``fallback`` says.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Sequence
from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from nncompress.data import example_input
from nncompress.errors import ConstraintError, UnsupportedLayerError
from nncompress.graph import ChannelGroup, channel_groups
from nncompress.prune import reconstruct as rc
from nncompress.prune.structured import (
    l1_importance,
    plan_for_macs,
    prunable_groups,
    prune_channels,
    rewrite_builtins,
    select_by_ratio,
)
from nncompress.technique import TECHNIQUES, Context, Technique, TechniqueConfig
from nncompress.train import reseed_loader

__all__ = ["ChannelSelectConfig", "channel_lasso", "thinet"]

Patterns = Annotated[tuple[str, ...], Field(strict=False)]


class ChannelSelectConfig(TechniqueConfig):
    """Parameters of ``channel_lasso`` and ``thinet``.

    - ``ratio``: fraction of each eligible group's channels removed, in (0, 1); or
    - ``macs_reduction``: remove one uniform fraction from every eligible group, the
      smallest that makes the model's MACs at most ``baseline / macs_reduction``.
    - ``samples``: sampled output locations per consumer (the papers use ~10 per image).
    - ``batches``: training batches the samples are drawn from.
    - ``fallback``: what happens to a non-eligible group -- ``"l1"`` prunes it by the L1
      norm of its filters at the same fraction, ``"skip"`` leaves it (named in the log).
    - ``epochs`` / ``lr``: fine-tuning after all groups are pruned (0: none).
    - ``layers`` / ``exclude``: fnmatch patterns over group names.
    """

    ratio: float | None = Field(default=None, gt=0.0, lt=1.0)
    macs_reduction: float | None = Field(default=None, gt=1.0)
    samples: int = Field(default=2000, ge=16)
    batches: int = Field(default=8, ge=1)
    fallback: Literal["l1", "skip"] = "skip"
    epochs: int = Field(default=0, ge=0)
    lr: float = Field(default=1e-3, gt=0.0, le=1.0)
    layers: Patterns = ("*",)
    exclude: Patterns = ()

    @model_validator(mode="after")
    def _one_target(self) -> ChannelSelectConfig:
        if (self.ratio is None) == (self.macs_reduction is None):
            raise ValueError("give exactly one of ratio or macs_reduction")
        return self


Chooser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], tuple[list[int],
                                                                             torch.Tensor]]


def _lasso(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, keep: int
           ) -> tuple[list[int], torch.Tensor]:
    kept = rc.lasso_select(x, w, y, keep)
    return kept, rc.least_squares_weight(x, y, kept)


def _thinet(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, keep: int
            ) -> tuple[list[int], torch.Tensor]:
    kept, xhat = rc.thinet_select(x, w, keep)
    return kept, w[:, kept] * rc.thinet_scales(xhat, kept).view(1, -1, 1)


def _selected(groups: Sequence[ChannelGroup], cfg: ChannelSelectConfig) -> list[ChannelGroup]:
    def match(name: str, patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in patterns)

    return [g for g in groups if match(g.name, cfg.layers) and not match(g.name, cfg.exclude)]


def _consumer(model: nn.Module, group: ChannelGroup) -> nn.Module | None:
    """The group's single channel-mixing consumer, or None when it is not eligible."""
    if len(group.consumers) != 1:
        return None
    layer = model.get_submodule(group.consumers[0])
    if type(layer) is nn.Linear and group.unit_width >= 1:
        return layer
    if type(layer) in (nn.Conv1d, nn.Conv2d) and layer.groups == 1 and (
            group.unit_width == 1):
        return layer
    return None


def _keep_counts(model: nn.Module, groups: Sequence[ChannelGroup], x: torch.Tensor,
                 cfg: ChannelSelectConfig) -> dict[str, int]:
    """How many units each group keeps: ``ratio`` per group, or the uniform fraction that
    reaches ``macs_reduction`` (found by the shared planner on L1 scores; which units go
    does not change the MAC count)."""
    scores = {g.name: l1_importance(model, g) for g in groups}
    if cfg.ratio is not None:
        keep = select_by_ratio(scores, cfg.ratio, "layer")
    else:
        keep = plan_for_macs(model, x, groups, scores, cfg.macs_reduction or 1.0, "layer")
    return {name: len(kept) for name, kept in keep.items()}


def _top_l1(model: nn.Module, group: ChannelGroup, keep: int) -> list[int]:
    scores = l1_importance(model, group)
    return sorted(torch.argsort(scores, descending=True)[:keep].tolist())


def _batches(ctx: Context, count: int) -> list[torch.Tensor]:
    reseed_loader(ctx.data.train, ctx.seed)  # the same batches whatever ran before
    out: list[torch.Tensor] = []
    for x, _ in ctx.data.train:
        out.append(x)
        if len(out) == count:
            break
    return out


def _prune_group(model: nn.Module, ref: nn.Module, group: ChannelGroup, keep: int,
                 chooser: Chooser, cfg: ChannelSelectConfig, ctx: Context,
                 x_example: torch.Tensor) -> None:
    """Choose ``keep`` channels of ``group`` from sampled consumer inputs, remove the rest
    and write the repaired consumer weights."""
    batches = _batches(ctx, cfg.batches)
    uw = group.unit_width
    layer, ref_layer = model.get_submodule(group.consumers[0]), ref.get_submodule(
        group.consumers[0])
    x = rc.sample_inputs(model, layer, batches, samples=cfg.samples, seed=ctx.seed,
                         unit_width=uw)
    x_ref = rc.sample_inputs(ref, ref_layer, batches, samples=cfg.samples, seed=ctx.seed,
                             unit_width=uw)
    y = rc.output_of(x_ref, rc.consumer_weight(ref_layer, uw))
    kept, new_w = chooser(x, rc.consumer_weight(layer, uw), y, keep)
    prune_channels(model, {group.name: kept}, x_example, masks=ctx.masks)
    rc.set_consumer_weight(model.get_submodule(group.consumers[0]), new_w)


def _run(method: str, chooser: Chooser, model: nn.Module, cfg: ChannelSelectConfig,
         ctx: Context) -> nn.Module:
    model = rewrite_builtins(model, ctx.masks, ctx.note, method)
    x_example = example_input(ctx.data, 1)
    groups = _selected(prunable_groups(model, x_example, ctx.note), cfg)
    eligible = [g for g in groups if _consumer(model, g) is not None]
    others = [g for g in groups if _consumer(model, g) is None]
    if others:
        what = "pruned by L1 norm" if cfg.fallback == "l1" else "not pruned"
        ctx.note(f"{method}: no single Linear/Conv consumer to reconstruct, {what}: "
                 + ", ".join(f"{g.name} ({g.kind})" for g in others))
    chosen = eligible + (others if cfg.fallback == "l1" else [])
    if not chosen and others:
        raise UnsupportedLayerError(
            f"{method}: no group has a single Linear / ungrouped Conv consumer reading each "
            f"unit as consecutive columns, which the reconstruction needs: "
            f"{', '.join(f'{g.name} ({g.kind})' for g in others)}; fallback='l1' prunes "
            "them by L1 norm instead")
    if not chosen:
        raise ConstraintError(f"{method}: no prunable channel group matches layers="
                              f"{list(cfg.layers)} exclude={list(cfg.exclude)}")
    counts = _keep_counts(model, chosen, x_example, cfg)
    ref = copy.deepcopy(model).eval()
    for group in chosen:
        current = {g.name: g for g in channel_groups(model, x_example)}[group.name]
        keep = counts[group.name]
        if keep >= current.size:
            continue
        if _consumer(model, current) is not None:
            _prune_group(model, ref, current, keep, chooser, cfg, ctx, x_example)
        else:
            prune_channels(model, {current.name: _top_l1(model, current, keep)}, x_example,
                           masks=ctx.masks)
        ctx.note(f"{method}: {current.name} {current.size} -> {keep} {current.kind}")
    if cfg.epochs:
        ctx.fine_tune(model, epochs=cfg.epochs, lr=cfg.lr, desc=f"{method} fine-tune")
    return model


def channel_lasso(model: nn.Module, config: ChannelSelectConfig, ctx: Context) -> nn.Module:
    """He, Zhang & Sun (2017) channel pruning, in place; returns the smaller model."""
    return _run("channel_lasso", _lasso, model, config, ctx)


def thinet(model: nn.Module, config: ChannelSelectConfig, ctx: Context) -> nn.Module:
    """Luo, Wu & Lin (2017) ThiNet, in place; returns the smaller model."""
    return _run("thinet", _thinet, model, config, ctx)


TECHNIQUES.register("channel_lasso", Technique(
    name="channel_lasso",
    category="pruning",
    paper="He, Zhang & Sun (2017): Channel pruning for accelerating very deep neural networks",
    summary="Choose channels by LASSO on the next layer's sampled inputs, refit that layer "
            "by least squares; the returned model has fewer channels.",
    config=ChannelSelectConfig,
    apply=channel_lasso,
))

TECHNIQUES.register("thinet", Technique(
    name="thinet",
    category="pruning",
    paper="Luo, Wu & Lin (2017): ThiNet: a filter level pruning method for deep neural "
          "network compression",
    summary="Greedily drop the channels the next layer misses least (from its sampled "
            "inputs), then rescale the kept ones by least squares; physically smaller.",
    config=ChannelSelectConfig,
    apply=thinet,
))
