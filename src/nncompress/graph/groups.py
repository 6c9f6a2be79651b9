"""Channel groups: the sets of layers whose units must be pruned together.

Structured pruning removes whole units (conv out channels, Linear out features, RNN hidden
units, attention heads, groups of a grouped convolution). Removing unit ``u`` of a group
removes, in every member, exactly the indices the group lists for ``u``: output rows of
its producers (role ``"out"``), input columns of its consumers (``"in"``), entries of its
norms (``"norm"``), and for an LSTM with projections the cell units (``"cell"``). A
:class:`ChannelGroup` lists all of them. This module is pure analysis: it never mutates
the model. How the groups are found:

- Coupling comes from torch-pruning's dependency graph (:mod:`nncompress.graph._trace`;
  Fang et al., "DepGraph", 2023): residual adds, concatenations, flattening, norms after
  any layer (BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm), depthwise
  convolutions, and recurrent layers (``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN`` of any depth,
  bidirectional, with projections) whose output any of these read.
- Units are then formed from channels by the layers that need several channels to go
  together (one union-find over all groups): a stacked or bidirectional RNN has one
  hidden width for all its layers and directions, so hidden unit ``j`` of every layer and
  direction is one unit; a grouped convolution (``1 < groups < in_channels``) can only
  lose whole groups, which ties its input block ``k`` to its output block ``k`` (merging
  the group that feeds it with the group it feeds); a ``GroupNorm`` ties the channels of
  each of its groups.
- Attention heads have groups of their own (``"<name>:heads"``; head ``h`` owns rows
  ``h*hd:(h+1)*hd`` of q/k/v and the same columns of the output projection) for the
  reference transformer's ``MultiHeadSelfAttention`` and for
  :class:`~nncompress.modules.SplitMultiheadAttention` (``nn.MultiheadAttention`` after
  :func:`~nncompress.modules.decompose`). DepGraph groups that touch an attention
  projection are dropped: this excludes the residual width of a transformer (embedding,
  norms, every block's input and output), which is not offered for pruning.
- An LSTM with ``proj_size`` also has a ``"<name>:cell"`` group: its cell units, internal
  to the layer (gate rows, columns of ``weight_hr``).

Groups that read no layer (the model's output units) are never offered. A group that
cannot be pruned safely -- a member of a type with no surgery rule, a bare parameter on
the channel path, a multi-dimensional LayerNorm, a built-in whose forward reads weights
directly -- is left out and reported by :func:`analyse` with the reason, naming the
layer; the other groups stay prunable.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from nncompress.graph._trace import NORMS, RNN, RawGroup, rnn_width, traced_groups
from nncompress.inputs import Inputs
from nncompress.models.transformer import MultiHeadSelfAttention
from nncompress.modules.attention import SplitMultiheadAttention

__all__ = ["HANDLED", "ROLE_TYPES", "Analysis", "ChannelGroup", "analyse", "channel_groups"]

CONV = (nn.Conv1d, nn.Conv2d)
ATTENTION = {MultiHeadSelfAttention: ("q", "k", "v", "out"),
             SplitMultiheadAttention: ("q_proj", "k_proj", "v_proj", "out_proj")}

#: role -> layer types a group member of that role may have (the surgery rules in
#: ``prune/structured.py`` cover exactly these)
ROLE_TYPES: dict[str, tuple[type[nn.Module], ...]] = {
    "out": (nn.Linear, *CONV, *RNN, nn.Embedding),
    "in": (nn.Linear, *CONV, *RNN),
    "norm": NORMS,
    "cell": (nn.LSTM,),
}
#: every layer type structured pruning knows (kept for callers that list them)
HANDLED: tuple[type[nn.Module], ...] = tuple(
    {t for types in ROLE_TYPES.values() for t in types} | set(ATTENTION))

Units = tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class ChannelGroup:
    """Units pruned together.

    ``size`` units. ``index``: ``(module, role, units)`` per member, ``units[u]`` the
    indices unit ``u`` owns in that member (output channels / hidden units for ``"out"``,
    input channels for ``"in"``, features for ``"norm"``, cell units for ``"cell"``).
    ``unit_width``: consumer input columns per unit when every consumer gives unit ``u``
    the columns ``u*w .. (u+1)*w - 1`` (a flattened feature map's positions, a head's
    dimensions); 0 when the layout is another one (a bidirectional RNN's output,
    a concatenation).
    """

    name: str
    kind: str
    size: int
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    norms: tuple[str, ...]
    unit_width: int = 1
    index: tuple[tuple[str, str, Units], ...] = ()

    def units(self, module: str, role: str) -> Units:
        """``units[u]``: the indices of ``module`` (in ``role``) that unit ``u`` owns."""
        for name, r, units in self.index:
            if name == module and r == role:
                return units
        raise KeyError(f"{module!r} is not a {role!r} member of group {self.name!r}")

    def members(self, role: str) -> tuple[str, ...]:
        return tuple(name for name, r, _ in self.index if r == role)


@dataclass(frozen=True)
class Analysis:
    """Prunable ``groups`` and ``(group, reason)`` for each group left alone."""

    groups: tuple[ChannelGroup, ...]
    skipped: tuple[tuple[str, str], ...]


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[object, object] = {}

    def find(self, a: object) -> object:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: object, b: object) -> None:
        self.parent[self.find(a)] = self.find(b)


def _grouped(m: nn.Module) -> bool:
    return isinstance(m, CONV) and m.groups > 1 and not (
        m.groups == m.in_channels == m.out_channels)


def _depthwise(m: nn.Module) -> bool:
    return isinstance(m, CONV) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _tie_key(m: nn.Module, name: str, role: str, idx: int) -> tuple | None:
    """The block a channel belongs to when ``m`` removes channels only in blocks."""
    if isinstance(m, RNN) and role == "out":
        return (name, "rnn", idx % rnn_width(m))
    if _grouped(m) and role in ("in", "out"):
        block = (m.in_channels if role == "in" else m.out_channels) // m.groups
        return (name, "conv-group", idx // block)
    if isinstance(m, nn.GroupNorm) and role == "norm":
        return (name, "norm-group", idx // (m.num_channels // m.num_groups))
    return None


def _tie(model: nn.Module, raws: Sequence[RawGroup]) -> _UnionFind:
    """Union-find over ``(group index, root channel)``: channels that one layer can only
    remove together end in one component (= one unit)."""
    uf = _UnionFind()
    first: dict[tuple, tuple[int, int]] = {}
    for gi, raw in enumerate(raws):
        for r in range(raw.root_size):
            uf.find((gi, r))
        for name, role, pairs in raw.members:
            m = model.get_submodule(name)
            for idx, root in pairs:
                key = _tie_key(m, name, role, idx)
                if key is None:
                    continue
                if key in first:
                    uf.union(first[key], (gi, root))
                else:
                    first[key] = (gi, root)
    return uf


def _problem(model: nn.Module, raw: RawGroup) -> str | None:
    """Why a traced group cannot be pruned safely, or None."""
    if raw.params:
        return (f"its channels flow through parameter(s) {', '.join(raw.params)} that "
                "belong to no layer type structured pruning knows")
    for name, role, _ in raw.members:
        m = model.get_submodule(name)
        if not isinstance(m, ROLE_TYPES[role]):
            return f"{name} ({type(m).__name__}) has no structured-pruning rule as {role}"
        if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and len(m.normalized_shape) != 1:
            return f"{name} ({type(m).__name__}) normalises over several dimensions"
        if isinstance(m, nn.Embedding) and role == "out" and m.max_norm is not None:
            return f"{name} (Embedding with max_norm) renormalises whole rows"
    return None


def _merge(model: nn.Module, raws: Sequence[RawGroup], ids: list[int],
           uf: _UnionFind) -> ChannelGroup:
    """One group from the traced groups ``ids`` (connected by tied channels)."""
    comps: dict[object, int] = {}
    for gi in ids:
        for r in range(raws[gi].root_size):
            comps.setdefault(uf.find((gi, r)), len(comps))
    size = len(comps)
    acc: dict[tuple[str, str], list[set[int]]] = {}
    for gi in ids:
        for name, role, pairs in raws[gi].members:
            m = model.get_submodule(name)
            if _depthwise(m) and role == "in":
                continue  # its input is its output: the "out" rule covers it
            per = acc.setdefault((name, role), [set() for _ in range(size)])
            for idx, root in pairs:
                unit = comps[uf.find((gi, root))]
                per[unit].add(idx % rnn_width(m) if isinstance(m, RNN) and role == "out"
                              else idx)
    rank = {n: i for i, (n, _) in enumerate(model.named_modules())}
    index = tuple((n, r, tuple(tuple(sorted(s)) for s in per))
                  for (n, r), per in sorted(acc.items(), key=lambda e: rank[e[0][0]]))
    producers = tuple(n for n, r, _ in index if r == "out")
    rnn_first = isinstance(model.get_submodule(producers[0]), RNN)
    return ChannelGroup(
        name=f"{producers[0]}:hidden" if rnn_first else producers[0],
        kind="hidden" if rnn_first else "channels", size=size, producers=producers,
        consumers=tuple(n for n, r, _ in index if r == "in"),
        norms=tuple(n for n, r, _ in index if r == "norm"),
        unit_width=_unit_width(index), index=index)


def _unit_width(index: Iterable[tuple[str, str, Units]]) -> int:
    widths = set()
    for _, role, units in index:
        if role != "in":
            continue
        w = len(units[0]) if units else 0
        if w == 0 or any(tuple(range(u * w, (u + 1) * w)) != idx for u, idx in enumerate(units)):
            return 0
        widths.add(w)
    return widths.pop() if len(widths) == 1 else (1 if not widths else 0)


def _components(raws: Sequence[RawGroup], uf: _UnionFind) -> list[list[int]]:
    """Traced groups connected by a tied unit, in order of their first member."""
    owner: dict[object, int] = {}
    link = _UnionFind()
    for gi, raw in enumerate(raws):
        link.find(gi)
        for r in range(raw.root_size):
            root = uf.find((gi, r))
            if root in owner:
                link.union(owner[root], gi)
            else:
                owner[root] = gi
    sets: dict[object, list[int]] = {}
    for gi in range(len(raws)):
        sets.setdefault(link.find(gi), []).append(gi)
    return list(sets.values())


def _head_groups(model: nn.Module) -> tuple[list[ChannelGroup], list[tuple[str, str]]]:
    groups, skipped = [], []
    for name, m in model.named_modules():
        parts = next((v for k, v in ATTENTION.items() if isinstance(m, k)), None)
        if parts is None:
            continue
        paths = [f"{name}.{p}" if name else p for p in parts]
        if not all(type(model.get_submodule(p)) is nn.Linear for p in paths):
            skipped.append((f"{name}:heads", "its projections are not plain nn.Linear"))
            continue
        hd, heads = m.head_dim, m.num_heads
        units = tuple(tuple(range(h * hd, (h + 1) * hd)) for h in range(heads))
        index = (*tuple((p, "out", units) for p in paths[:3]), (paths[3], "in", units))
        groups.append(ChannelGroup(f"{name}:heads", "heads", heads, tuple(paths[:3]),
                                   (paths[3],), (), hd, index))
    return groups, skipped


def _cell_groups(model: nn.Module) -> list[ChannelGroup]:
    return [ChannelGroup(f"{name}:cell", "cell", m.hidden_size, (name,), (), (), 1,
                         ((name, "cell", tuple((j,) for j in range(m.hidden_size))),))
            for name, m in model.named_modules()
            if isinstance(m, nn.LSTM) and m.proj_size > 0]


def _builtin_problems(model: nn.Module) -> list[tuple[str, str]]:
    return [(name or "<model>", f"{type(m).__name__} reads its weights directly; rewrite it "
             "with nncompress.modules.decompose (compress does) to prune it")
            for name, m in model.named_modules()
            if isinstance(m, (nn.MultiheadAttention, nn.TransformerEncoderLayer))]


def _projections(model: nn.Module) -> set[str]:
    out = set()
    for name, m in model.named_modules():
        for k, parts in ATTENTION.items():
            if isinstance(m, k):
                out |= {f"{name}.{p}" if name else p for p in parts}
    return out


def analyse(model: nn.Module, example_input: Inputs) -> Analysis:
    """Every prunable group of ``model`` and the groups left alone with their reasons.

    ``example_input``: one batch (any input form, see :mod:`nncompress.inputs`) used to
    trace the model. The model is not changed (its train/eval flags are restored).
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        attention = _projections(model)
        raws, failed = traced_groups(model, example_input, attention)
    finally:
        for m, flag in flags:
            m.training = flag
    skipped = list(failed) + _builtin_problems(model)
    raws = [r for r in raws if not attention & {n for n, _, _ in r.members}]
    uf = _tie(model, raws)
    groups: list[ChannelGroup] = []
    for ids in _components(raws, uf):
        if any(not any(role == "in" for _, role, _ in raws[gi].members) for gi in ids):
            continue  # (part of) the model's output
        problem = next((p for p in (_problem(model, raws[gi]) for gi in ids) if p), None)
        if problem is not None:
            skipped.append((raws[ids[0]].root, problem))
            continue
        groups.append(_merge(model, raws, ids, uf))
    heads, bad_heads = _head_groups(model)
    groups += heads + _cell_groups(model)
    rank = {n: i for i, (n, _) in enumerate(model.named_modules())}
    groups.sort(key=lambda g: (rank[g.producers[0]], g.kind == "cell"))
    return Analysis(tuple(groups), tuple(skipped + bad_heads))


def channel_groups(model: nn.Module, example_input: Inputs) -> list[ChannelGroup]:
    """The prunable groups of :func:`analyse`, ordered by their first producer's position
    (groups left alone are dropped; :func:`analyse` says why)."""
    return list(analyse(model, example_input).groups)
