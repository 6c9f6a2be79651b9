"""Structured-pruning surgery and the helpers every structured technique shares.

:func:`prune_channels` physically removes units of :class:`~nncompress.graph.ChannelGroup`
s from every member -- producers (output rows), consumers (input columns), norms, LSTM
cells -- through one table of rules keyed by role and layer type
(:data:`nncompress.prune._surgery.RULES`).
:func:`l1_importance` scores units by the L1 norm of their producer weights (Li et al.,
"Pruning Filters for Efficient ConvNets", 2017); :func:`select_by_ratio` turns scores into
keep-indices; :func:`plan_for_macs` finds the uniform/global ratio that reaches a MAC target.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
from torch import nn

from nncompress import inputs
from nncompress.errors import ConstraintError, ModelError
from nncompress.graph import ChannelGroup, channel_groups
from nncompress.measure import count_macs
from nncompress.prune._surgery import apply_rule, score_of

__all__ = ["drop_stale_masks", "group_l1_importance", "l1_importance", "plan_for_macs",
           "prunable_groups", "prune_channels", "ratio_keep", "rewrite_builtins",
           "select_by_ratio"]

Scope = Literal["layer", "global"]
Selector = Callable[[Mapping[str, torch.Tensor], float], dict[str, list[int]]]


def _shapes(out: object) -> object:
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, (tuple, list)):
        return tuple(_shapes(o) for o in out)
    if isinstance(out, Mapping):
        return {k: _shapes(v) for k, v in out.items()}
    return None


def _trial(model: nn.Module, groups: Sequence[ChannelGroup], example: inputs.Inputs,
           reference: object) -> str | None:
    """Remove the last unit of every group in a copy of ``model`` and run it: None when it
    runs and gives outputs of the reference shapes, else what went wrong."""
    trial = copy.deepcopy(model).eval()
    try:
        _cut(trial, [(g, range(g.size - 1)) for g in groups])
        with torch.no_grad():
            shapes = _shapes(inputs.call(trial, example))
    except Exception as exc:  # any failure means the group's coupling is incomplete
        return " ".join(f"{type(exc).__name__}: {exc}".split())[:160]
    if shapes != reference:
        return f"outputs change shape from {reference} to {shapes}"
    return None


def prunable_groups(model: nn.Module, example_input: inputs.Inputs,
                    note: Callable[[str], None] | None = None) -> list[ChannelGroup]:
    """The groups of :func:`~nncompress.graph.analyse` that survive a trial removal: one
    unit of every group is removed in a copy of the model and the copy must run with
    outputs of the same shapes (groups are bisected when the joint trial fails). Groups
    left alone -- by the analysis or by the trial, e.g. a layer reading a weight of
    another layer directly -- are reported through ``note`` with the reason."""
    from nncompress.graph import analyse

    found = analyse(model, example_input)
    report = note or (lambda _msg: None)
    for name, reason in found.skipped:
        report(f"structured pruning leaves {name} alone: {reason}")
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            reference = _shapes(inputs.call(model, example_input))
        candidates = [g for g in found.groups if g.size > 1]
        bad = _failing(model, candidates, example_input, reference)
    finally:
        for m, flag in flags:
            m.training = flag
    for group, reason in bad:
        report(f"structured pruning leaves {group.name} alone: removing a unit breaks the "
               f"model ({reason})")
    failed = {g.name for g, _ in bad}
    return [g for g in candidates if g.name not in failed]


def _failing(model: nn.Module, groups: Sequence[ChannelGroup], example: inputs.Inputs,
             reference: object) -> list[tuple[ChannelGroup, str]]:
    """Groups whose trial removal fails (bisection over a joint trial)."""
    if not groups:
        return []
    reason = _trial(model, groups, example, reference)
    if reason is None:
        return []
    if len(groups) == 1:
        return [(groups[0], reason)]
    half = len(groups) // 2
    return (_failing(model, groups[:half], example, reference)
            + _failing(model, groups[half:], example, reference))


def prune_channels(model: nn.Module, keep: Mapping[str, Sequence[int]],
                   example_input: torch.Tensor, *,
                   groups: Sequence[ChannelGroup] | None = None,
                   masks: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Remove, in place, every unit not in ``keep[group.name]`` from each named group.

    ``keep`` maps group names (from :func:`channel_groups`) to the unit indices to keep
    (any order; kept units stay in ascending order). Groups not in ``keep`` are untouched.
    Raises ModelError for an unknown group name, ConstraintError for an empty or
    out-of-range keep list. Returns ``model``. ``groups``: this model's current groups
    (from :func:`channel_groups`), to skip re-tracing the model. ``masks``: pruning
    keep-masks by parameter name (a ``Context.masks``), sliced in place like their
    parameters so that connection pruning done earlier survives the surgery.
    """
    found = channel_groups(model, example_input) if groups is None else groups
    by_name = {g.name: g for g in found}
    unknown = sorted(set(keep) - set(by_name))
    if unknown:
        raise ModelError(f"unknown channel group(s) {unknown}; known: {sorted(by_name)}")
    plans = {}
    for name, indices in keep.items():
        group = by_name[name]
        idx = sorted(set(int(i) for i in indices))
        if not idx:
            raise ConstraintError(f"group {name!r}: at least one unit must be kept")
        if idx[0] < 0 or idx[-1] >= group.size:
            raise ConstraintError(f"group {name!r}: keep index out of range 0..{group.size - 1}")
        if len(idx) < group.size:
            plans[name] = idx
    if masks and plans:
        _slice_masks(model, plans, example_input, found, masks)
    _cut(model, [(by_name[name], idx) for name, idx in plans.items()])
    return model


def _cut(model: nn.Module, plans: Sequence[tuple[ChannelGroup, Sequence[int]]]) -> None:
    """Keep the given units of every group, all at once: each member's indices are
    numbered as in the unpruned model, so a layer that several groups reach (a
    concatenation's consumer) is cut once, by the union of what they remove. Producers
    go first (a grouped convolution's outputs decide its inputs)."""
    removed: dict[tuple[str, str], set[int]] = {}
    for group, units in plans:
        dropped = set(range(group.size)) - set(units)
        for module, role, per_unit in group.index:
            removed.setdefault((module, role), set()).update(
                i for u in dropped for i in per_unit[u])
    order = {"out": 0, "cell": 1, "in": 2, "norm": 3}
    for (module, role), gone in sorted(removed.items(), key=lambda e: order[e[0][1]]):
        layer = model.get_submodule(module)
        size = score_of(role, layer).numel()
        kept = torch.tensor([i for i in range(size) if i not in gone], dtype=torch.long)
        apply_rule(module, role, layer, kept)


def _slice_masks(model: nn.Module, keep: Mapping[str, Sequence[int]],
                 example_input: torch.Tensor, groups: Sequence[ChannelGroup],
                 masks: dict[str, torch.Tensor]) -> None:
    """Apply the same surgery to a copy of ``model`` whose masked parameters hold their
    masks (surgery only selects rows and columns, so the values pass through exactly),
    then read the sliced masks back."""
    shadow = copy.deepcopy(model)
    params = dict(shadow.named_parameters())
    carried = [n for n, m in masks.items() if n in params and params[n].shape == m.shape]
    with torch.no_grad():
        for name in carried:
            params[name].copy_(masks[name].to(params[name].dtype))
    by_name = {g.name: g for g in groups}
    _cut(shadow, [(by_name[name], idx) for name, idx in keep.items()])
    after = dict(shadow.named_parameters())
    for name in list(masks):
        if name in carried and name in after:
            masks[name] = after[name].detach().cpu() != 0
        else:
            del masks[name]


def _unit_sum(values: torch.Tensor, units: Sequence[Sequence[int]]) -> torch.Tensor:
    """``[len(units)]``: the sum of ``values`` over each unit's indices."""
    return torch.stack([values[list(u)].sum() if len(u) else values.new_zeros(())
                        for u in units])


def _member_scores(model: nn.Module, group: ChannelGroup, roles: Sequence[str]
                   ) -> list[torch.Tensor]:
    """Per member of the given roles, the L1 mass of each unit (``[group.size]``)."""
    return [_unit_sum(score_of(role, model.get_submodule(name)), units)
            for name, role, units in group.index if role in roles]


def l1_importance(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """``[group.size]``: sum of |w| of each unit's producer rows (all gates of every layer
    and direction for an RNN, the q/k/v rows of a head, the depthwise filter in a
    depthwise group, the gate rows of a cell unit)."""
    return torch.stack(_member_scores(model, group, ("out", "cell"))).sum(dim=0)


def group_l1_importance(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """``[group.size]``: the L1 evidence of every tensor the unit lives in -- producer rows,
    consumer columns and norm scales |gamma| -- each divided by its mean over the group,
    then averaged (the group-level magnitude criterion of torch-pruning's
    ``MagnitudeImportance``, Fang et al. 2023). Unlike the filter norm alone, it sees a
    BatchNorm that scales a channel down, and how much the next layer relies on it."""
    parts = [s / s.mean().clamp_min(1e-12)
             for s in _member_scores(model, group, ("out", "cell", "in", "norm"))]
    return torch.stack(parts).mean(dim=0)


def ratio_keep(score: torch.Tensor, ratio: float) -> list[int]:
    """Indices of the ``size - round(ratio * size)`` highest scores (>= 1), ascending."""
    size = score.numel()
    n_keep = max(1, size - round(ratio * size))
    return sorted(torch.argsort(score, descending=True, stable=True)[:n_keep].tolist())


def select_by_ratio(scores: Mapping[str, torch.Tensor], ratio: float | Mapping[str, float],
                    scope: Scope = "layer") -> dict[str, list[int]]:
    """Keep-indices removing fraction ``ratio`` of units per group (``"layer"``) or of all
    units together (``"global"``: scores divided by their group's mean so groups with
    different fan-in compare; every group keeps >= 1 unit)."""
    if scope not in ("layer", "global"):
        raise ConstraintError(f"scope must be 'layer' or 'global', got {scope!r}")
    ratios = ratio if isinstance(ratio, Mapping) else dict.fromkeys(scores, ratio)
    for name, r in ratios.items():
        if not 0.0 <= float(r) < 1.0:
            raise ConstraintError(f"pruning ratio for {name!r} must be in [0, 1), got {r!r}")
    if scope == "layer":
        return {n: ratio_keep(s, float(ratios.get(n, 0.0))) for n, s in scores.items()}
    if isinstance(ratio, Mapping):
        raise ConstraintError("scope='global' takes one ratio, not a per-group mapping")
    names = list(scores)
    normed = [scores[n] / scores[n].mean().clamp_min(1e-12) for n in names]
    flat = torch.cat(normed)
    owner = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(normed)])
    n_drop = round(float(ratio) * flat.numel())
    kept = torch.ones(flat.numel(), dtype=torch.bool)
    left = [s.numel() for s in normed]
    for j in torch.argsort(flat, stable=True).tolist():
        if n_drop == 0:
            break
        if left[int(owner[j])] > 1:
            kept[j] = False
            left[int(owner[j])] -= 1
            n_drop -= 1
    parts = kept.split([s.numel() for s in normed])
    return {n: torch.nonzero(p).flatten().tolist() for n, p in zip(names, parts, strict=True)}


def plan_for_macs(model: nn.Module, example_input: torch.Tensor,
                  groups: Sequence[ChannelGroup], scores: Mapping[str, torch.Tensor],
                  macs_ratio: float, scope: Scope = "layer", *,
                  select: Selector | None = None) -> dict[str, list[int]]:
    """Keep dict for ``groups`` (scored by ``scores``) such that the pruned model has at
    most ``count_macs(model) / macs_ratio`` MACs per sample, found by bisection over one
    ratio (uniform per group, or global). ``select(scores, ratio) -> keep`` replaces
    :func:`select_by_ratio` (e.g. a raw global threshold). ConstraintError if unreachable."""
    if macs_ratio < 1.0:
        raise ConstraintError(f"macs_reduction must be >= 1, got {macs_ratio!r}")
    one = inputs.take(example_input, 1)
    budget = count_macs(model, one).total / macs_ratio
    chosen = {g.name: scores[g.name] for g in groups}

    def macs(ratio: float) -> tuple[int, dict[str, list[int]]]:
        keep = select(chosen, ratio) if select else select_by_ratio(chosen, ratio, scope)
        trial = prune_channels(copy.deepcopy(model), keep, one, groups=groups)
        return count_macs(trial, one).total, keep

    lo, hi = 0.0, 0.999
    best_macs, best = macs(hi)
    if best_macs > budget:
        raise ConstraintError(f"cannot reach {macs_ratio}x fewer MACs by pruning these groups: "
                              f"at most {count_macs(model, one).total / best_macs:.2f}x")
    for _ in range(14):
        mid = (lo + hi) / 2
        total, keep = macs(mid)
        if total <= budget:
            hi, best = mid, keep
        else:
            lo = mid
    return best


def rewrite_builtins(model: nn.Module, masks: dict[str, torch.Tensor],
                     note: Callable[[str], None], who: str) -> nn.Module:
    """:func:`~nncompress.modules.decompose` ``model`` (built-ins that read their weights
    directly become equivalents with called projections), noting each rewrite; returns
    the model (a new object only when the model itself was such a built-in)."""
    from nncompress.modules import decompose

    model, notes = decompose(model, masks)
    for line in notes:
        note(f"{who}: rewrote {line}")
    return model


def drop_stale_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> list[str]:
    """Remove entries of ``masks`` whose parameter is gone or changed shape; returns them."""
    params = dict(model.named_parameters())
    stale = [n for n, m in masks.items() if n not in params or params[n].shape != m.shape]
    for name in stale:
        del masks[name]
    return stale
