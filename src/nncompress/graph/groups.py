"""Channel groups: the sets of layers whose units must be pruned together.

Structured pruning removes whole units (conv out channels, Linear out features, RNN hidden
units, attention heads). Removing unit ``j`` of a producer forces removing the matching
input columns of every consumer and the per-channel entries of every norm in between; a
:class:`ChannelGroup` lists all of them. This module is pure analysis: it never mutates
the model.

How groups are found (one table, :data:`HANDLED`, keyed by module type):

- Conv / Linear / BatchNorm / LayerNorm coupling comes from torch-pruning's dependency
  graph (Fang et al., "DepGraph: Towards Any Structural Pruning", 2023): it traces the
  model and couples, e.g., every residual add and the depthwise conv's groups.
- ``nn.GRU`` / ``nn.LSTM`` (one layer, unidirectional) get one ``"<name>:hidden"`` group
  of their own: hidden unit ``j`` owns gate rows ``j, H+j, ...`` of ``weight_ih`` /
  ``weight_hh`` / biases and column ``j`` of ``weight_hh``; its consumer is the next
  module with parameters in execution order (the next RNN's ``weight_ih`` or a Linear).
- ``MultiHeadSelfAttention`` gets one ``"<name>:heads"`` group: head ``h`` owns rows
  ``h*hd:(h+1)*hd`` of q/k/v and the same columns of ``out`` (``unit_width = hd``).
- Dependency-graph groups that touch an RNN or an attention projection are dropped in
  favour of the rules above; this EXCLUDES the transformer's residual width group
  (embed out, ``pos_embedding``, every LayerNorm, q/k/v in, out/fc2 out): it is not
  offered for pruning. Groups with no consumer are the model's output (classifier
  out_features) and are never offered.

A module with its own parameters whose type is not in :data:`HANDLED` (``nn.Embedding``,
``nn.RNN``, a custom layer, ...) makes :func:`channel_groups` raise
:class:`UnsupportedLayerError` naming it, because its coupling cannot be verified.
Bare parameters on the root module (the transformer's ``pos_embedding``) are allowed:
they only belong to the excluded residual width group.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from nncompress.errors import ModelError, UnsupportedLayerError
from nncompress.models.transformer import MultiHeadSelfAttention

__all__ = ["HANDLED", "ChannelGroup", "channel_groups"]

CONV = (nn.Conv1d, nn.Conv2d)
RNN = (nn.GRU, nn.LSTM)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)

#: module type -> how its units are found ("graph": torch-pruning dependency graph,
#: "rnn": own hidden-unit group, "heads": own head group, "norm": follows a group)
HANDLED: dict[type[nn.Module], str] = {
    nn.Conv1d: "graph", nn.Conv2d: "graph", nn.Linear: "graph",
    nn.BatchNorm1d: "norm", nn.BatchNorm2d: "norm", nn.LayerNorm: "norm",
    nn.GRU: "rnn", nn.LSTM: "rnn", MultiHeadSelfAttention: "heads",
}


@dataclass(frozen=True)
class ChannelGroup:
    """Units pruned together.

    ``size`` units; producer ``p`` owns ``rows(p) / size`` consecutive output rows per
    unit, consumer ``c`` owns ``unit_width`` (``in_features / size`` for a Linear after a
    Flatten or after attention heads) consecutive input columns per unit.
    """

    name: str
    kind: str
    size: int
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    norms: tuple[str, ...]
    unit_width: int = 1


def _check_types(model: nn.Module) -> None:
    """Raise UnsupportedLayerError for parameter-holding modules of unknown type."""
    bad = [f"{name} ({type(m).__name__})" for name, m in model.named_modules()
           if name and list(m.parameters(recurse=False))
           and not any(isinstance(m, t) for t in HANDLED)]
    for name, m in model.named_modules():
        if isinstance(m, RNN) and (m.num_layers != 1 or m.bidirectional
                                   or getattr(m, "proj_size", 0) > 0):
            bad.append(f"{name} ({type(m).__name__} with num_layers>1/bidirectional/proj)")
    if bad:
        raise UnsupportedLayerError(f"structured pruning cannot handle: {', '.join(bad)}")


def _execution_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of parameter-holding leaf modules (and attention blocks) in call order."""
    order: list[str] = []
    hooks = []
    for name, m in model.named_modules():
        if name and isinstance(m, (*RNN, *CONV, nn.Linear)):
            hooks.append(m.register_forward_hook(
                lambda _m, _i, _o, n=name: order.append(n)))
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            model(x)
            model.train(was)
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(order))


def _rnn_groups(model: nn.Module, order: list[str]) -> list[ChannelGroup]:
    modules = dict(model.named_modules())
    groups = []
    for name, m in modules.items():
        if not isinstance(m, RNN):
            continue
        after = order[order.index(name) + 1:] if name in order else []
        if not after:
            continue  # the RNN's output is the model output: not prunable
        consumer = modules[after[0]]
        width = consumer.input_size if isinstance(consumer, RNN) else getattr(
            consumer, "in_features", getattr(consumer, "in_channels", None))
        if width != m.hidden_size:
            raise UnsupportedLayerError(
                f"{name} ({type(m).__name__}) feeds {after[0]} ({type(consumer).__name__}) "
                f"through an operation that changes the width; cannot prune its hidden units")
        groups.append(ChannelGroup(f"{name}:hidden", "hidden", m.hidden_size, (name,),
                                   (after[0],), ()))
    return groups


def _head_groups(model: nn.Module) -> list[ChannelGroup]:
    return [ChannelGroup(f"{name}:heads", "heads", m.num_heads,
                         (f"{name}.q", f"{name}.k", f"{name}.v"), (f"{name}.out",), (),
                         m.head_dim)
            for name, m in model.named_modules() if isinstance(m, MultiHeadSelfAttention)]


def _graph_groups(model: nn.Module, x: torch.Tensor, custom: set[str]) -> list[ChannelGroup]:
    import torch_pruning as tp

    names = {m: n for n, m in model.named_modules()}
    rank = {n: i for i, n in enumerate(names.values())}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
        found = list(graph.get_all_groups(root_module_types=[*CONV, nn.Linear]))
    groups = []
    for group in found:
        prod: list[str] = []
        cons: list[str] = []
        norms: list[str] = []
        for item in group:
            dep = item[0]
            module, name = dep.target.module, names.get(dep.target.module)
            if name is None:
                continue
            handler = getattr(dep.handler, "__name__", str(dep.handler))
            if isinstance(module, NORMS):
                norms.append(name)
            elif "out_channels" in handler:
                prod.append(name)
            elif "in_channels" in handler:
                cons.append(name)
        prod, cons, norms = (sorted(set(v), key=rank.__getitem__) for v in (prod, cons, norms))
        depthwise = [n for n in cons if n in prod]
        cons = [n for n in cons if n not in depthwise]
        if not prod or not cons or custom & set(prod + cons):
            continue
        groups.append(_linear_group(model, prod, cons, norms))
    return groups


def _linear_group(model: nn.Module, prod: list[str], cons: list[str],
                  norms: list[str]) -> ChannelGroup:
    modules = dict(model.named_modules())
    first = modules[prod[0]]
    size = first.out_channels if isinstance(first, CONV) else first.out_features
    widths = {(modules[c].in_channels if isinstance(modules[c], CONV)
               else modules[c].in_features) for c in cons}
    if any(w % size for w in widths):
        raise ModelError(f"group {prod[0]!r}: consumer widths {sorted(widths)} are not "
                         f"multiples of its {size} channels")
    return ChannelGroup(prod[0], "channels", size, tuple(prod), tuple(cons), tuple(norms),
                        max(widths) // size)


def channel_groups(model: nn.Module, example_input: torch.Tensor) -> list[ChannelGroup]:
    """Every prunable group of ``model``, ordered by its first producer's position.

    ``example_input``: one batch ``[B, *input_shape]`` (B >= 1) used to trace the model.
    Never includes the model's output units or its input. Raises
    :class:`UnsupportedLayerError` naming any parameter-holding module of a type not in
    :data:`HANDLED`. The model is not changed (its train/eval flag is restored).
    """
    _check_types(model)
    was = model.training
    model.eval()
    try:
        order = _execution_order(model, example_input)
        custom = {n for n, m in model.named_modules() if isinstance(m, RNN)}
        heads = _head_groups(model)
        custom |= {p for g in heads for p in (*g.producers, *g.consumers)}
        groups = _graph_groups(model, example_input, custom) + _rnn_groups(model, order) + heads
    finally:
        model.train(was)
    rank = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(groups, key=lambda g: rank[g.producers[0]])
