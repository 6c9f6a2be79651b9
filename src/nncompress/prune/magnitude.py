"""Magnitude connection pruning with iterative fine-tuning.

Han, Pool, Tran & Dally (2015), "Learning both weights and connections for efficient
neural networks": train, remove the connections whose weights have the smallest
magnitude, retrain the remaining ones; repeating prune/retrain at rising sparsity
("iterative pruning") keeps more accuracy than pruning once.

The masks go into ``ctx.masks`` so every later fine-tuning keeps the pruned weights at
zero; the saved ``.nnc`` then shrinks because the container stores mostly-zero tensors
in a sparse encoding.

``schedule="gradual"`` replaces the discrete steps by the automated gradual pruning of
Zhu & Gupta (2017), "To prune, or not to prune: exploring the efficacy of pruning for
model compression": during one masked fine-tuning run of ``n`` optimizer steps the
sparsity follows the cubic ramp ``s_t = s_f * (1 - (1 - t / n_ramp) ** 3)`` and the masks
are recomputed every ``frequency`` steps (then held at ``s_f`` for the rest of the run).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from nncompress import train
from nncompress.errors import ConstraintError, ModelError
from nncompress.prune.masks import (
    apply_masks,
    find_prunable,
    mask_sparsity,
    selected_weights,
)
from nncompress.technique import TECHNIQUES, Context, Technique, TechniqueConfig

__all__ = ["MagnitudePruneConfig", "gradual_sparsity", "magnitude_masks", "magnitude_prune"]

Scope = Literal["layer", "global"]
Schedule = Literal["iterative", "gradual"]
Patterns = Annotated[tuple[str, ...], Field(strict=False)]


class MagnitudePruneConfig(TechniqueConfig):
    """Parameters of ``magnitude_prune``.

    - ``sparsity``: fraction of the selected prunable weights set to zero, in [0, 1).
    - ``scope``: ``"layer"`` prunes every layer to ``sparsity``; ``"global"`` uses one
      magnitude threshold over all selected weights (small-magnitude layers lose more).
    - ``steps``: prune to ``sparsity * k / steps`` at step k = 1..steps.
    - ``epochs_per_step``: masked fine-tuning epochs after each step (0: none).
    - ``lr``: learning rate of that fine-tuning.
    - ``layers`` / ``exclude``: fnmatch patterns over parameter names choosing which
      prunable weights (see ``prune.masks.PRUNABLE``) are pruned; default all of them.
    - ``schedule``: ``"iterative"`` (default, Han et al. 2015): ``steps`` discrete steps;
      ``"gradual"`` (Zhu & Gupta 2017): one fine-tuning run of ``steps * epochs_per_step``
      epochs (the same budget) along the cubic sparsity ramp.
    - ``frequency``: gradual only: optimizer steps between two mask updates.
    - ``ramp_fraction``: gradual only: share of the run over which sparsity ramps to
      ``sparsity``; the rest fine-tunes at the final sparsity.
    """

    sparsity: float = Field(ge=0.0, lt=1.0)
    scope: Scope = "layer"
    steps: int = Field(default=1, ge=1, le=1000)
    epochs_per_step: int = Field(default=1, ge=0)
    lr: float = Field(default=1e-4, gt=0.0, le=1.0)
    layers: Patterns = ("*",)
    exclude: Patterns = ()
    schedule: Schedule = "iterative"
    frequency: int = Field(default=10, ge=1)
    ramp_fraction: float = Field(default=0.75, gt=0.0, le=1.0)


def _scores(model: nn.Module, names: Sequence[str],
            existing: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """|w| per selected weight (flattened, CPU float), -1 where an existing mask prunes."""
    params = dict(model.named_parameters())
    scores: dict[str, torch.Tensor] = {}
    for name in names:
        score = params[name].detach().abs().float().cpu().flatten()
        mask = existing.get(name)
        if mask is not None:
            if mask.shape != params[name].shape:
                raise ModelError(f"existing pruning mask for {name!r} has shape "
                                 f"{tuple(mask.shape)}, the weight has "
                                 f"{tuple(params[name].shape)}")
            score = torch.where(mask.cpu().flatten().bool(), score, torch.full_like(score, -1.0))
        scores[name] = score
    return scores


def _keep_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool keep-mask dropping exactly round(sparsity * n) lowest scores (ties: first)."""
    k = round(sparsity * score.numel())
    keep = torch.ones(score.numel(), dtype=torch.bool)
    if k > 0:
        keep[torch.argsort(score, stable=True)[:k]] = False
    return keep


def magnitude_masks(model: nn.Module, sparsity: float, scope: Scope = "layer", *,
                    layers: Sequence[str] = ("*",), exclude: Sequence[str] = (),
                    existing: Mapping[str, torch.Tensor] | None = None,
                    ) -> dict[str, torch.Tensor]:
    """Keep-masks that zero the smallest-magnitude fraction ``sparsity`` of prunable weights.

    Pure analysis: ``model`` is not changed. Returns ``{param name: bool tensor shaped like
    the weight}`` for every selected prunable weight. With ``scope="layer"`` each weight
    loses exactly ``round(sparsity * numel)`` entries; with ``"global"`` the
    ``round(sparsity * total)`` smallest magnitudes over all selected weights go. Entries
    already False in ``existing`` count as pruned first and stay False (the result is the
    AND with them), so sparsity never falls below an earlier pruning's.
    """
    if isinstance(sparsity, bool) or not 0.0 <= float(sparsity) < 1.0:
        raise ConstraintError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if scope not in ("layer", "global"):
        raise ConstraintError(f"scope must be 'layer' or 'global', got {scope!r}")
    names = selected_weights(model, layers, exclude)
    scores = _scores(model, names, existing or {})
    if scope == "layer":
        flat = {n: _keep_mask(s, sparsity) for n, s in scores.items()}
    else:
        keep = _keep_mask(torch.cat(list(scores.values())), sparsity)
        flat = dict(zip(names, keep.split([s.numel() for s in scores.values()]), strict=True))
    params = dict(model.named_parameters())
    out = {n: flat[n].reshape(params[n].shape).clone() for n in names}
    for name, mask in (existing or {}).items():
        if name in out:
            out[name] &= mask.to(device="cpu", dtype=torch.bool)
    return out


def gradual_sparsity(step: int, final: float, ramp_steps: int) -> float:
    """Zhu & Gupta (2017) cubic ramp: ``final * (1 - (1 - step / ramp_steps) ** 3)``.

    ``step`` counts optimizer steps from 0; from ``ramp_steps`` on it returns ``final``.
    """
    if ramp_steps <= 0:
        return final
    t = min(max(step, 0), ramp_steps) / ramp_steps
    return final * (1.0 - (1.0 - t) ** 3)


def _prune_to(model: nn.Module, config: MagnitudePruneConfig, ctx: Context,
              target: float) -> dict[str, torch.Tensor]:
    masks = magnitude_masks(model, target, config.scope, layers=config.layers,
                            exclude=config.exclude, existing=ctx.masks)
    ctx.masks.update(masks)
    apply_masks(model, ctx.masks)
    return masks


def _gradual(model: nn.Module, config: MagnitudePruneConfig, ctx: Context) -> nn.Module:
    """One masked fine-tuning run along the cubic ramp (Zhu & Gupta, 2017)."""
    epochs = config.steps * config.epochs_per_step
    try:
        per_epoch = max(1, len(ctx.data.train))
    except TypeError as exc:
        raise ModelError("schedule='gradual' needs a train loader with a length") from exc
    ramp = max(1, round(config.ramp_fraction * epochs * per_epoch))
    counter = [0]

    def after_step(m: nn.Module) -> None:
        counter[0] += 1
        t = counter[0]
        if t <= ramp and (t % config.frequency == 0 or t == ramp):
            _prune_to(m, config, ctx, gradual_sparsity(t, config.sparsity, ramp))
        else:
            apply_masks(m, ctx.masks)

    if epochs > 0:
        apply_masks(model, ctx.masks)
        train.fine_tune(model, ctx.data, epochs=epochs, lr=config.lr, seed=ctx.seed,
                        progress=ctx.progress, desc="gradual prune", after_step=after_step,
                        **ctx.train_options())
    masks = _prune_to(model, config, ctx, config.sparsity)   # the ramp's end, exactly
    ctx.note(f"magnitude_prune gradual: {config.scope} sparsity "
             f"{100 * mask_sparsity(masks):.2f} % (target {100 * config.sparsity:.2f} %) "
             f"after {counter[0]} steps ({ramp} ramp steps, mask update every "
             f"{config.frequency})")
    return model


def magnitude_prune(model: nn.Module, config: MagnitudePruneConfig, ctx: Context) -> nn.Module:
    """Prune ``model`` in place (Han et al., 2015; gradual: Zhu & Gupta, 2017).

    The masks go to ``ctx.masks``.
    """
    found = find_prunable(model)
    for line in found.unsupported:
        ctx.note(f"magnitude_prune: not pruned, no pruning rule for parameter {line}")
    if config.schedule == "gradual":
        return _gradual(model, config, ctx)
    for step in range(1, config.steps + 1):
        target = config.sparsity * step / config.steps
        masks = magnitude_masks(model, target, config.scope, layers=config.layers,
                                exclude=config.exclude, existing=ctx.masks)
        ctx.masks.update(masks)
        apply_masks(model, masks)
        total = sum(m.numel() for m in masks.values())
        ctx.note(f"magnitude_prune step {step}/{config.steps}: {config.scope} sparsity "
                 f"{100 * mask_sparsity(masks):.2f} % (target {100 * target:.2f} %) of "
                 f"{total} weights in {len(masks)} tensors")
        if config.epochs_per_step > 0:
            ctx.fine_tune(model, epochs=config.epochs_per_step, lr=config.lr,
                          desc=f"prune step {step}/{config.steps}")
    return model


TECHNIQUES.register("magnitude_prune", Technique(
    name="magnitude_prune",
    category="pruning",
    paper="Han, Pool, Tran & Dally (2015): Learning both weights and connections for "
          "efficient neural networks",
    summary="Zero the smallest-magnitude weights (per layer or globally), in steps with "
            "masked fine-tuning after each, or along Zhu & Gupta's (2017) gradual cubic "
            "ramp; the zeros are stored sparsely.",
    config=MagnitudePruneConfig,
    apply=magnitude_prune,
))
