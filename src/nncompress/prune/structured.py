"""Structured-pruning surgery and the helpers every structured technique shares.

:func:`prune_channels` physically removes units of :class:`~nncompress.graph.ChannelGroup`
s from their producers (output rows), consumers (input columns) and norms, through one
table of per-type rules (:data:`PRODUCER_RULES`, :data:`CONSUMER_RULES`, :data:`NORM_RULES`).
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
from nncompress.errors import ConstraintError, ModelError, UnsupportedLayerError
from nncompress.graph import ChannelGroup, channel_groups
from nncompress.measure import count_macs

__all__ = ["drop_stale_masks", "group_l1_importance", "l1_importance", "plan_for_macs",
           "prune_channels", "ratio_keep", "select_by_ratio"]

Scope = Literal["layer", "global"]
Selector = Callable[[Mapping[str, torch.Tensor], float], dict[str, list[int]]]


def _rows(n_units: int, per_unit: int, keep: torch.Tensor) -> torch.Tensor:
    """Row indices of kept units when each unit owns ``per_unit`` consecutive rows."""
    return (keep[:, None] * per_unit + torch.arange(per_unit)[None, :]).flatten()


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))
    else:
        setattr(module, name, value.contiguous())


def _prune_conv_out(m: nn.Module, keep: torch.Tensor, size: int) -> None:
    rows = _rows(size, m.out_channels // size, keep)
    depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
    if m.groups > 1 and not depthwise:
        raise UnsupportedLayerError(f"grouped {type(m).__name__} with groups={m.groups}")
    _set(m, "weight", m.weight.data[rows])
    if m.bias is not None:
        _set(m, "bias", m.bias.data[rows])
    m.out_channels = len(rows)
    if depthwise:
        m.in_channels = m.groups = len(rows)


def _prune_linear_out(m: nn.Linear, keep: torch.Tensor, size: int) -> None:
    rows = _rows(size, m.out_features // size, keep)
    _set(m, "weight", m.weight.data[rows])
    if m.bias is not None:
        _set(m, "bias", m.bias.data[rows])
    m.out_features = len(rows)


def _gate_rows(m: nn.RNNBase, keep: torch.Tensor) -> torch.Tensor:
    gates = m.weight_hh_l0.shape[0] // m.hidden_size
    return torch.cat([keep + g * m.hidden_size for g in range(gates)])


def _prune_rnn_out(m: nn.RNNBase, keep: torch.Tensor, size: int) -> None:
    rows = _gate_rows(m, keep)
    for name in ("weight_ih_l0", "bias_ih_l0", "bias_hh_l0"):
        if hasattr(m, name) and getattr(m, name) is not None:
            _set(m, name, getattr(m, name).data[rows])
    _set(m, "weight_hh_l0", m.weight_hh_l0.data[rows][:, keep])
    m.hidden_size = len(keep)
    m._init_flat_weights()


def _prune_conv_in(m: nn.Module, keep: torch.Tensor, size: int) -> None:
    if m.groups != 1:
        raise UnsupportedLayerError(f"grouped {type(m).__name__} (groups={m.groups}) as consumer")
    cols = _rows(size, m.in_channels // size, keep)
    _set(m, "weight", m.weight.data[:, cols])
    m.in_channels = len(cols)


def _prune_linear_in(m: nn.Linear, keep: torch.Tensor, size: int) -> None:
    cols = _rows(size, m.in_features // size, keep)
    _set(m, "weight", m.weight.data[:, cols])
    m.in_features = len(cols)


def _prune_rnn_in(m: nn.RNNBase, keep: torch.Tensor, size: int) -> None:
    _set(m, "weight_ih_l0", m.weight_ih_l0.data[:, keep])
    m.input_size = len(keep)
    m._init_flat_weights()


def _prune_bn(m: nn.Module, keep: torch.Tensor, size: int) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        if getattr(m, name, None) is not None:
            _set(m, name, getattr(m, name).data[keep])
    m.num_features = len(keep)


def _prune_ln(m: nn.LayerNorm, keep: torch.Tensor, size: int) -> None:
    for name in ("weight", "bias"):
        if getattr(m, name, None) is not None:
            _set(m, name, getattr(m, name).data[keep])
    m.normalized_shape = (len(keep),)


Rule = Callable[[nn.Module, torch.Tensor, int], None]
PRODUCER_RULES: dict[type[nn.Module], Rule] = {
    nn.Conv1d: _prune_conv_out, nn.Conv2d: _prune_conv_out, nn.Linear: _prune_linear_out,
    nn.GRU: _prune_rnn_out, nn.LSTM: _prune_rnn_out,
}
CONSUMER_RULES: dict[type[nn.Module], Rule] = {
    nn.Conv1d: _prune_conv_in, nn.Conv2d: _prune_conv_in, nn.Linear: _prune_linear_in,
    nn.GRU: _prune_rnn_in, nn.LSTM: _prune_rnn_in,
}
NORM_RULES: dict[type[nn.Module], Rule] = {
    nn.BatchNorm1d: _prune_bn, nn.BatchNorm2d: _prune_bn, nn.LayerNorm: _prune_ln,
}


def _apply(table: Mapping[type[nn.Module], Rule], modules: Mapping[str, nn.Module],
           names: Sequence[str], keep: torch.Tensor, size: int) -> None:
    for name in names:
        rule = table.get(type(modules[name]))
        if rule is None:
            raise UnsupportedLayerError(f"no structured-pruning rule for {name} "
                                        f"({type(modules[name]).__name__})")
        rule(modules[name], keep, size)


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
    if masks:
        _slice_masks(model, keep, example_input, found, masks)
    by_name = {g.name: g for g in found}
    unknown = sorted(set(keep) - set(by_name))
    if unknown:
        raise ModelError(f"unknown channel group(s) {unknown}; known: {sorted(by_name)}")
    modules = dict(model.named_modules())
    for name, indices in keep.items():
        group = by_name[name]
        idx = torch.tensor(sorted(set(int(i) for i in indices)), dtype=torch.long)
        if idx.numel() == 0:
            raise ConstraintError(f"group {name!r}: at least one unit must be kept")
        if idx[0] < 0 or idx[-1] >= group.size:
            raise ConstraintError(f"group {name!r}: keep index out of range 0..{group.size - 1}")
        if idx.numel() == group.size:
            continue
        _apply(PRODUCER_RULES, modules, group.producers, idx, group.size)
        _apply(CONSUMER_RULES, modules, group.consumers, idx, group.size)
        _apply(NORM_RULES, modules, group.norms, idx, group.size)
    return model


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
    prune_channels(shadow, keep, example_input, groups=groups)
    after = dict(shadow.named_parameters())
    for name in list(masks):
        if name in carried and name in after:
            masks[name] = after[name].detach().cpu() != 0
        else:
            del masks[name]


def l1_importance(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """``[group.size]``: sum of |w| of each unit's producer rows (all gates for an RNN,
    the q/k/v rows of a head, the depthwise filter in a depthwise group)."""
    modules = dict(model.named_modules())
    score = torch.zeros(group.size)
    for name in group.producers:
        m = modules[name]
        if isinstance(m, nn.RNNBase):
            for w in (m.weight_ih_l0, m.weight_hh_l0):
                score += w.detach().abs().float().cpu().reshape(-1, group.size, w.shape[1]).sum(
                    dim=(0, 2))
        else:
            w = m.weight.detach().abs().float().cpu()
            score += w.reshape(group.size, -1).sum(dim=1)
    return score


def group_l1_importance(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """``[group.size]``: the L1 evidence of every tensor the unit lives in -- producer rows,
    consumer columns (``unit_width`` per unit) and norm scales |gamma| -- each divided by
    its mean over the group, then averaged (the group-level magnitude criterion of
    torch-pruning's ``MagnitudeImportance``, Fang et al. 2023). Unlike the filter norm
    alone, it sees a BatchNorm that scales a channel down, and how much the next layer
    relies on it."""
    modules = dict(model.named_modules())
    parts: list[torch.Tensor] = []

    def add(score: torch.Tensor) -> None:
        parts.append(score / score.mean().clamp_min(1e-12))

    for name in group.producers:
        m = modules[name]
        if isinstance(m, nn.RNNBase):
            for w in (m.weight_ih_l0, m.weight_hh_l0):
                add(w.detach().abs().float().cpu().reshape(-1, group.size, w.shape[1]).sum(
                    dim=(0, 2)))
        else:
            add(m.weight.detach().abs().float().cpu().reshape(group.size, -1).sum(dim=1))
    for name in group.consumers:
        m = modules[name]
        w = m.weight_ih_l0 if isinstance(m, nn.RNNBase) else m.weight
        cols = w.detach().abs().float().cpu().transpose(0, 1)  # [in, out, ...]
        add(cols.reshape(group.size, -1).sum(dim=1))
    for name in group.norms:
        weight = getattr(modules[name], "weight", None)
        if weight is not None:
            add(weight.detach().abs().float().cpu())
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


def drop_stale_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> list[str]:
    """Remove entries of ``masks`` whose parameter is gone or changed shape; returns them."""
    params = dict(model.named_parameters())
    stale = [n for n, m in masks.items() if n not in params or params[n].shape != m.shape]
    for name in stale:
        del masks[name]
    return stale
