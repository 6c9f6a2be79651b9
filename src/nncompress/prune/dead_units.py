"""Dead-unit elimination: physically remove the hidden units / channels that unstructured
pruning left without a live incoming or outgoing weight, with the same outputs.

Han, Pool, Tran & Dally (2015), "Learning both weights and connections for efficient
neural networks", prune neurons left with zero input or zero output connections after
connection pruning. After magnitude pruning, sparse VD, DNS or weight sharing with
``zero_below``, units of a coupled :class:`~nncompress.graph.ChannelGroup` (producer rows,
norm entries, consumer columns) are dead in one of two ways:

- **no live outgoing weight** (its columns are zero in every consumer): never read; removed.
- **no live incoming weight** (its rows are zero: the whole filter of a conv; in every
  producer of a residual group; the depthwise filter of a depthwise group): a consumer
  reads a constant ``c`` (its bias through the norm and activation in between). ``c`` is
  measured with forward hooks at every consumer's input on a few training batches and
  checked to be the same for every sample and position; ``W_consumer[:, unit] @ c``
  (kernel taps summed) is added to the consumer's bias (created if missing) and the unit
  is removed. Han et al. drop such neurons; folding keeps the outputs exact. A conv that
  pads with zeros reads ``0``, not ``c``, at its borders: there only ``c == 0`` is folded,
  other units stay (noted).

Removal is :func:`~nncompress.prune.structured.prune_channels` (pruning masks sliced).
Removing units can leave the next layer's rows or columns all-zero, so rounds repeat until
nothing is found; after each, the outputs on the calibration batches (eval mode: BatchNorm
constants are inference-mode ones) must match within :data:`VERIFY_TOLERANCE`, else
:class:`ModelError` names the groups. The work is done on a copy; the model given is
never modified.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from nncompress import inputs
from nncompress.data import example_input
from nncompress.errors import ModelError, UnsupportedLayerError
from nncompress.graph import ChannelGroup, channel_groups
from nncompress.prune.sensitivity import select_groups
from nncompress.prune.structured import drop_stale_masks, prune_channels
from nncompress.technique import TECHNIQUES, Context, Technique, TechniqueConfig
from nncompress.train import reseed_loader

__all__ = ["DeadUnitsConfig", "UnitPlan", "dead_units", "eliminate", "find_dead_units"]

Patterns = Annotated[tuple[str, ...], Field(strict=False)]
CONV = (nn.Conv1d, nn.Conv2d)
#: layer types whose units this technique removes, as producer and as consumer
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
#: norms that act per unit in eval mode (a LayerNorm mixes units: not handled)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
CONSTANT_TOLERANCE = 1e-6  # max spread of a "constant" input, relative to max(1, |c|)
VERIFY_TOLERANCE = 1e-5    # max |output change| per round, relative to max(1, max |output|)
MAX_ROUNDS = 16
Fold = tuple[str, torch.Tensor, torch.Tensor]  # consumer, its input columns, constants


class DeadUnitsConfig(TechniqueConfig):
    """Parameters of ``dead_units``.

    - ``layers`` / ``exclude``: fnmatch patterns over channel-group names (the group's
      first producer, e.g. ``"layers.fc1"``). Handled: ``"channels"`` groups of Linear /
      ungrouped or depthwise Conv layers with BatchNorm between; with the default ``"*"``
      other groups (RNN hidden units, heads, LayerNorm, grouped convs) are left alone and
      noted, a group named explicitly must be handled (else UnsupportedLayerError).
    - ``tolerance``: a weight with ``|w| <= tolerance`` counts as dead. ``0`` (default)
      means exact: the outputs do not change. Above 0 the dead units' small weights are
      zeroed first, which changes the outputs by what they contributed (reported).
    - ``batches``: training batches on which the constants are measured and checked.
    """

    layers: Patterns = ("*",)
    exclude: Patterns = ()
    tolerance: float = Field(default=0.0, ge=0.0)
    batches: int = Field(default=4, ge=1, le=1000)


@dataclass(frozen=True)
class UnitPlan:
    """One group's dead units (indices): ``unused`` (no live outgoing weight), ``folded``
    (no live incoming weight; ``folds``: (consumer, its input columns, their constants)),
    ``left`` (no live incoming weight but kept, and why)."""

    group: ChannelGroup
    unused: tuple[int, ...] = ()
    folded: tuple[int, ...] = ()
    left: tuple[tuple[int, str], ...] = ()
    folds: tuple[Fold, ...] = ()

    @property
    def keep(self) -> list[int]:
        """Units that stay (the plan leaves at least one)."""
        gone = set(self.unused) | set(self.folded)
        return [j for j in range(self.group.size) if j not in gone]

    @property
    def removed(self) -> int:
        return self.group.size - len(self.keep)


def _depthwise(m: nn.Module) -> bool:
    return isinstance(m, CONV) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _chain(model: nn.Module, group: ChannelGroup) -> list[str]:
    """The producers whose rows decide a unit's input: the depthwise convs of a depthwise
    group (each unit's value is their output), else every producer (residual adds)."""
    mods = dict(model.named_modules())
    return [p for p in group.producers if _depthwise(mods[p])] or list(group.producers)


def dead_masks(model: nn.Module, group: ChannelGroup,
               tolerance: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(no_outgoing, no_incoming)`` bool ``[group.size]``: every consumer column of the
    unit is dead; the unit's input is provably constant (all non-depthwise producer rows
    dead, or, in a depthwise group, every depthwise filter dead). Dead: ``|w| <= tol``."""
    mods = dict(model.named_modules())

    def dead(names: Sequence[str], role: str) -> torch.Tensor:
        out = torch.ones(group.size, dtype=torch.bool)
        dim = 0 if role == "out" else 1
        for name in names:  # per row (dim 0) / column (dim 1): every weight in it dead
            w = mods[name].weight.detach().abs().transpose(0, dim)
            each = (w.reshape(w.shape[0], -1) <= tolerance).all(dim=1)
            out &= torch.stack([each[list(idx)].all() for idx in group.units(name, role)])
        return out

    return dead(group.consumers, "in"), dead(_chain(model, group), "out")


def unsupported(model: nn.Module, group: ChannelGroup) -> str | None:
    """Why this technique leaves ``group`` alone (naming the layer), or None."""
    if group.kind != "channels":
        return f"{group.kind} units: only channel groups of Linear / Conv layers are handled"
    for name, role, _ in group.index:
        m = model.get_submodule(name)
        grouped = isinstance(m, CONV) and m.groups > 1 and (role == "in" or not _depthwise(m))
        if grouped or not isinstance(m, NORMS if role == "norm" else LAYERS):
            return (f"{name} ({type(m).__name__}{', grouped' if grouped else ''}) as {role}: "
                    "only Linear / ungrouped or depthwise Conv layers and BatchNorm")
    return None


def consumer_stats(model: nn.Module, names: Sequence[str],
                   batches: Sequence[inputs.Inputs]) -> dict[str, torch.Tensor]:
    """``[3, in_columns]`` per named consumer: min, max and mean of what each input column
    (a conv's channel) read over ``batches``, all samples and positions (eval mode)."""
    mods = dict(model.named_modules())
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def hook(m: nn.Module, args: tuple[torch.Tensor, ...], name: str) -> None:
        x = args[0].detach().double()
        ch = (1 if x.dim() == m.weight.dim() else 0) if isinstance(m, CONV) else x.dim() - 1
        rows = x.movedim(ch, -1).reshape(-1, x.shape[ch])
        seen[name].append(torch.stack([rows.amin(0), rows.amax(0), rows.sum(0),
                                       torch.full_like(rows[0], rows.shape[0])]))

    handles = [mods[n].register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n))
               for n in names]
    try:
        _outputs(model, batches)
    finally:
        for h in handles:
            h.remove()
    every = {n: torch.stack(p) for n, p in seen.items() if p}  # a consumer never run: none
    return {n: torch.stack([e[:, 0].amin(0), e[:, 1].amax(0), e[:, 2].sum(0) / e[:, 3].sum(0)])
            for n, e in every.items()}


def _zero_padded(m: nn.Module) -> bool:
    """True for a convolution that pads with zeros (so reads 0, not c, at its borders)."""
    if not isinstance(m, CONV) or m.padding_mode != "zeros":
        return False
    if isinstance(m.padding, str):
        return m.padding == "same" and any(k > 1 for k in m.kernel_size)
    return any(p > 0 for p in m.padding)


def _constant_of(m: nn.Module, name: str, stats: torch.Tensor,
                 cols: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """The constant per column ``cols`` that consumer ``m`` reads, or None and why not."""
    lo, hi, mean = stats[:, cols]
    scale = torch.maximum(lo.abs(), hi.abs()).clamp_min(1.0)
    if bool(((hi - lo) > CONSTANT_TOLERANCE * scale).any()):
        return None, f"its input to {name} is not constant"
    if _zero_padded(m) and bool((hi != 0).any() or (lo != 0).any()):
        return None, (f"{name} pads with zeros (padding={m.padding}): a non-zero constant "
                      "is not one bias at its borders")
    return mean, ""


def _unit_constants(mods: Mapping[str, nn.Module], group: ChannelGroup, j: int,
                    stats: Mapping[str, torch.Tensor]) -> list[Fold] | str:
    """(consumer, its columns of unit ``j``, the constant of each) for every consumer, or
    why unit ``j``'s constant cannot be folded."""
    found = []
    for c in group.consumers:
        cols = torch.tensor(group.units(c, "in")[j], dtype=torch.long)
        if c not in stats:
            return f"{c} did not run on the calibration batches"
        value, why = _constant_of(mods[c], c, stats[c], cols)
        if value is None:
            return why
        found.append((c, cols, value))
    return found


def _plan_group(model: nn.Module, group: ChannelGroup, stats: Mapping[str, torch.Tensor],
                no_out: torch.Tensor, no_in: torch.Tensor) -> UnitPlan:
    mods = dict(model.named_modules())
    unused = torch.nonzero(no_out).flatten().tolist()
    folded: dict[int, list[Fold]] = {}
    left: list[tuple[int, str]] = []
    for j in torch.nonzero(no_in & ~no_out).flatten().tolist():
        found = _unit_constants(mods, group, j, stats)
        if isinstance(found, str):
            left.append((j, found))
        else:
            folded[j] = found
    if len(unused) + len(folded) == group.size:  # a group keeps at least one unit
        if unused:
            unused.pop(0)
        else:
            left.append((min(folded), "the group keeps at least one unit"))
            del folded[min(folded)]
    folds = tuple(f for found in folded.values() for f in found)
    return UnitPlan(group, tuple(unused), tuple(folded), tuple(left), folds)


def find_dead_units(model: nn.Module, groups: Sequence[ChannelGroup],
                    batches: Sequence[inputs.Inputs]) -> list[UnitPlan]:
    """Analysis only (the model is not changed): each group's exactly dead units, with the
    constants of the no-incoming ones measured on ``batches``. Every group must be one
    this technique handles (:func:`unsupported` gives None)."""
    masks = {g.name: dead_masks(model, g) for g in groups}
    needed = sorted({c for g in groups if bool((masks[g.name][1] & ~masks[g.name][0]).any())
                     for c in g.consumers})
    stats = consumer_stats(model, needed, batches) if needed else {}
    return [_plan_group(model, g, stats, *masks[g.name]) for g in groups]


def _fold(m: nn.Module, cols: torch.Tensor, values: torch.Tensor) -> bool:
    """Add ``W[:, cols] @ values`` (kernel taps summed) to ``m``'s bias; True if a bias
    had to be created."""
    w = m.weight.detach().double()
    w = w.flatten(2).sum(dim=2) if isinstance(m, CONV) else w
    delta = (w[:, cols] @ values).to(m.weight.dtype)
    created = m.bias is None and bool(delta.any())
    if created:
        m.bias = nn.Parameter(torch.zeros_like(delta))
    if m.bias is not None:
        with torch.no_grad():
            m.bias.add_(delta)
    return created


def _unit_bytes(model: nn.Module, group: ChannelGroup, units: Sequence[int]) -> int:
    """Bytes of the per-unit vectors (producer biases, norm parameters and statistics) of
    ``units`` of ``group``."""
    total = 0
    for name, role, owned in group.index:
        m = model.get_submodule(name)
        attrs = {"out": ("bias",), "norm": ("weight", "bias", "running_mean", "running_var")}
        for attr in attrs.get(role, ()):
            t = getattr(m, attr, None)
            if isinstance(t, torch.Tensor) and t.dim() == 1:
                total += t.element_size() * sum(len(owned[u]) for u in units)
    return total


def eliminate(model: nn.Module, plans: Sequence[UnitPlan], groups: Sequence[ChannelGroup],
              x: inputs.Inputs, masks: dict[str, torch.Tensor] | None = None,
              ) -> tuple[dict[str, int], list[str]]:
    """Surgery, in place: fold the planned constants, then remove the planned units with
    ``prune_channels`` (``masks`` sliced alike). Returns the bytes of per-unit vectors
    removed per group name, and the consumers that got a bias."""
    mods = dict(model.named_modules())
    removed = {p.group.name: _unit_bytes(model, p.group, (*p.unused, *p.folded))
               for p in plans}
    created = [name for p in plans for name, cols, values in p.folds
               if _fold(mods[name], cols, values)]
    keep = {p.group.name: p.keep for p in plans if p.removed}
    if keep:
        prune_channels(model, keep, x, groups=groups, masks=masks)
    return removed, created


def _zero_small(model: nn.Module, groups: Sequence[ChannelGroup], tolerance: float) -> None:
    """Zero the ``|w| <= tolerance`` rows and columns that make units count as dead."""
    mods = dict(model.named_modules())
    with torch.no_grad():
        for g in groups:
            no_out, no_in = dead_masks(model, g, tolerance)
            for names, role, dead in ((g.consumers, "in", no_out),
                                      (_chain(model, g), "out", no_in)):
                for name in names:
                    owned = g.units(name, role)
                    idx = [i for u in torch.nonzero(dead).flatten().tolist() for i in owned[u]]
                    mods[name].weight.transpose(0, 0 if role == "out" else 1)[idx] = 0


def _outputs(model: nn.Module, batches: Sequence[inputs.Inputs]) -> list[torch.Tensor]:
    """Every output tensor of ``model`` on every batch, in eval mode."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return [t for x in batches for t in inputs.leaves(inputs.call(model, x))]
    finally:
        model.train(was)


def _difference(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    """Largest |change| relative to max(1, max |want|); inf if any shape changed."""
    if [a.shape for a in got] != [b.shape for b in want]:
        return float("inf")
    scale = max([1.0] + [float(b.abs().max()) for b in want if b.numel()])
    return max([0.0] + [float((a - b).abs().max()) for a, b in zip(got, want, strict=True)
                        if a.numel()]) / scale


def _calibration(ctx: Context, count: int, device: torch.device) -> list[inputs.Inputs]:
    """The first ``count`` training batches (the same ones whatever ran before)."""
    reseed_loader(ctx.data.train, ctx.seed)
    out: list[inputs.Inputs] = []
    for x, _ in ctx.data.train:
        out.append(inputs.to(x, device))
        if len(out) == count:
            break
    return out


def _chosen(model: nn.Module, x: inputs.Inputs, config: DeadUnitsConfig,
            ctx: Context | None = None) -> tuple[list[ChannelGroup], list[ChannelGroup]]:
    """(all groups, the selected groups this technique handles). Groups named by explicit
    ``layers`` patterns must exist and be handled (ModelError / UnsupportedLayerError);
    with the default ``"*"`` the others are left alone, noted in ``ctx``."""
    found = channel_groups(model, x)
    matched = select_groups(found, config.layers, config.exclude, tuple({g.kind for g in found}))
    explicit = tuple(config.layers) != ("*",)
    if not matched and explicit:
        raise ModelError(f"dead_units: layers={list(config.layers)}, exclude="
                         f"{list(config.exclude)} match no channel group; groups: "
                         f"{', '.join(g.name for g in found) or 'none'}")
    bad = {g.name: why for g in matched if (why := unsupported(model, g))}
    if bad and explicit:
        raise UnsupportedLayerError(f"dead_units cannot handle group(s) {', '.join(bad)}: "
                                    f"{'; '.join(bad.values())}")
    for name, why in bad.items() if ctx is not None else ():
        ctx.note(f"dead_units: {name} left alone: {why}")
    return found, [g for g in matched if g.name not in bad]


@dataclass
class _Tally:
    """One group's totals over all rounds (``left``: from the last round)."""

    size: int
    unused: int = 0
    folded: int = 0
    removed_bytes: int = 0
    left: tuple[tuple[int, str], ...] = ()


def _vector_bytes(model: nn.Module) -> int:
    """Bytes of every 1-D parameter and buffer (biases, norm scales, shifts, statistics)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())
               if t.dim() == 1)


def _notes(ctx: Context, tallies: Mapping[str, _Tally], created: Sequence[str],
           vectors: tuple[int, int]) -> None:
    for name, t in tallies.items():
        if t.unused or t.folded:
            ctx.note(f"dead_units: {name}: removed {t.unused + t.folded} of {t.size} units "
                     f"({t.unused} with no live outgoing weight, {t.folded} with no live "
                     f"incoming weight, their constant folded into the next layer's bias); "
                     f"their {t.removed_bytes} bytes of biases / norm entries removed")
        for why in sorted({why for _, why in t.left}):
            ctx.note(f"dead_units: {name}: {sum(w == why for _, w in t.left)} unit(s) with "
                     f"no live incoming weight kept: {why}")
    if not any(t.unused or t.folded for t in tallies.values()):
        ctx.note("dead_units: no dead unit found")
        return
    made = f"; new biases (for folded constants): {', '.join(created)}" if created else ""
    ctx.note(f"dead_units: biases and norm vectors {vectors[0]} -> {vectors[1]} bytes{made}")


def _round(work: nn.Module, x: inputs.Inputs, config: DeadUnitsConfig,
           batches: Sequence[inputs.Inputs], masks: dict[str, torch.Tensor],
           tallies: dict[str, _Tally], created: list[str]) -> bool:
    """One analysis + surgery + check; False when nothing was left to remove."""
    found, chosen = _chosen(work, x, config)
    if config.tolerance > 0:
        _zero_small(work, chosen, config.tolerance)
    before = _outputs(work, batches)
    plans = find_dead_units(work, chosen, batches)
    for p in plans:
        tallies.setdefault(p.group.name, _Tally(p.group.size)).left = p.left
    if not any(p.removed for p in plans):
        return False
    removed, made = eliminate(work, plans, found, x, masks)
    change = _difference(_outputs(work, batches), before)
    if change > VERIFY_TOLERANCE:
        raise ModelError(f"dead_units: removing dead units of "
                         f"{', '.join(p.group.name for p in plans if p.removed)} changed the "
                         f"outputs by {change:.3g} (relative; an operation between their "
                         "layers mixes units?); model left unchanged, exclude the group")
    for p in plans:
        t = tallies[p.group.name]
        t.unused, t.folded = t.unused + len(p.unused), t.folded + len(p.folded)
        t.removed_bytes += removed[p.group.name]
    created += made
    return True


def dead_units(model: nn.Module, config: DeadUnitsConfig, ctx: Context) -> nn.Module:
    """Remove the units with no live incoming or outgoing weight (Han et al., 2015), folding
    constant outputs into the next layer's bias; returns a new, smaller model with the same
    outputs (``model`` itself is not changed). ``ctx.masks`` are sliced to match."""
    device = next(model.parameters()).device
    x = inputs.to(example_input(ctx.data, 2), device)
    batches = _calibration(ctx, config.batches, device)
    _chosen(model, x, config, ctx)  # refuse (or note what is left alone) before any work
    reference = _outputs(model, batches) if config.tolerance > 0 else []
    work = copy.deepcopy(model)
    masks = {k: v.clone() for k, v in ctx.masks.items()}
    tallies: dict[str, _Tally] = {}
    created: list[str] = []
    for _ in range(MAX_ROUNDS):
        if not _round(work, x, config, batches, masks, tallies, created):
            break
    _notes(ctx, tallies, created, (_vector_bytes(model), _vector_bytes(work)))
    if config.tolerance > 0:
        ctx.note(f"dead_units: tolerance {config.tolerance:g} changed the outputs by "
                 f"{_difference(_outputs(work, batches), reference):.3g} (relative)")
    ctx.masks.clear()
    ctx.masks.update(masks)
    drop_stale_masks(work, ctx.masks)
    return work


TECHNIQUES.register("dead_units", Technique(
    name="dead_units",
    category="pruning",
    paper="Han, Pool, Tran & Dally (2015): Learning both weights and connections for "
          "efficient neural networks (neurons left with zero input or output connections "
          "are removed; here their constant output is folded into the next layer)",
    summary="Physically remove hidden units / channels left with no live incoming or "
            "outgoing weight by unstructured pruning, folding constant outputs into the "
            "next layer's bias; same outputs, smaller and faster.",
    config=DeadUnitsConfig,
    apply=dead_units,
))
