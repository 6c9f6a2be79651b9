"""torch-pruning's dependency graph as plain data: which channels of which layers move
together.

Fang et al., "DepGraph: Towards Any Structural Pruning" (2023): tracing the autograd graph
of one forward pass couples every layer that reads or writes the same channels --
through residual adds, concatenations, flattening, norms and activations -- and maps each
channel index of a root layer to the indices it touches in every other layer.
:func:`traced_groups` returns, per root, the members ``(module name, role)`` with the
``(index, root index)`` pairs of that mapping. Recurrent layers join the graph through a
stand-in (:class:`RNNProxy`) that states their channel counts: DepGraph then
finds what reads their output (a LayerNorm, the next layer, a classifier) through any
operation. While tracing, each recurrent layer is swapped for an :class:`RNNProxy` (a
Linear from its inputs to its outputs, with a final state cut from the last step), so the
kernel's internal reshapes never reach DepGraph; the model is restored afterwards.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from nncompress import inputs
from nncompress.inputs import Inputs

__all__ = ["NORMS", "RNN", "RNNProxy", "RawGroup", "rnn_width", "traced_groups"]

RNN = (nn.GRU, nn.LSTM, nn.RNN)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
         nn.InstanceNorm1d, nn.InstanceNorm2d, nn.RMSNorm)
#: layer types that may be the root (the first producer) of a group
ROOTS = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.Embedding)


def rnn_width(m: nn.RNNBase) -> int:
    """Features per direction of an RNN's output: ``proj_size`` or ``hidden_size``."""
    return getattr(m, "proj_size", 0) or m.hidden_size


@dataclass(frozen=True)
class RawGroup:
    """One DepGraph group. ``root_size``: channels of the root layer. ``members``:
    ``(module name, role, ((index, root index), ...))`` with role ``"out"`` (a layer
    producing these channels), ``"in"`` (a layer reading them) or ``"norm"``;
    ``params``: names of bare parameters the channels also flow through (their owners
    are not layers DepGraph knows)."""

    root: str
    root_size: int
    members: tuple[tuple[str, str, tuple[tuple[int, int], ...]], ...]
    params: tuple[str, ...]


class RNNProxy(nn.Module):
    """Stand-in for an RNN while tracing: ``[..., T, in] -> [..., T, D * width]`` by one
    Linear (``proj``, which DepGraph sees as the RNN), and a final state ``[layers * D, B,
    width]`` cut from the last time step, so that layers reading either output are coupled
    to the right channels."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        dirs = 2 if rnn.bidirectional else 1
        ref = next(rnn.parameters())
        self.proj = nn.Linear(rnn.input_size, dirs * rnn_width(rnn), device=ref.device,
                              dtype=ref.dtype)
        self.dirs, self.layers = dirs, rnn.num_layers
        self.width, self.hidden = rnn_width(rnn), rnn.hidden_size
        self.batch_first, self.lstm = rnn.batch_first, isinstance(rnn, nn.LSTM)

    def forward(self, x: torch.Tensor, hx: object = None) -> tuple:
        out = self.proj(x)
        last = out[:, -1] if out.dim() == 3 and self.batch_first else out[-1]
        # per direction by slicing (DepGraph maps slices exactly), stacked [D, (B,) width]
        per_dir = torch.stack([last[..., d * self.width:(d + 1) * self.width]
                               for d in range(self.dirs)])
        state = per_dir.repeat(self.layers, *([1] * (per_dir.dim() - 1)))
        if not self.lstm:
            return out, state
        cell = torch.zeros(*state.shape[:-1], self.hidden, dtype=out.dtype, device=out.device)
        return out, (state, cell)


@contextmanager
def _proxies(model: nn.Module) -> Iterator[dict[nn.Module, str]]:
    """Swap every RNN of ``model`` for an :class:`RNNProxy`; yields ``{proxy Linear: RNN
    name}``; the RNNs are put back afterwards."""
    swapped = [(name, m) for name, m in model.named_modules() if isinstance(m, RNN) and name]
    stand_ins = {}
    try:
        for name, m in swapped:
            proxy = RNNProxy(m)
            model.set_submodule(name, proxy)
            stand_ins[proxy.proj] = name
        yield stand_ins
    finally:
        for name, m in swapped:
            model.set_submodule(name, m)


def _handler_role(handler: object) -> str | None:
    name = getattr(handler, "__name__", str(handler))
    if "out_channels" in name:
        return "out"
    if "in_channels" in name:
        return "in"
    return None


def _members(group, names: dict, params: dict) -> tuple[list, list[str]]:
    """Group items as ``(name, role, pairs)`` (norms as role "norm"), and bare params."""
    members: dict[tuple[str, str], list[tuple[int, int]]] = {}
    bare: list[str] = []
    for item in group:
        module = item.dep.target.module
        if isinstance(module, nn.Parameter):
            bare.append(params.get(id(module), "<parameter>"))
            continue
        name = names.get(module)
        role = _handler_role(item.dep.handler)
        if name is None or role is None:
            continue  # an operation (add, concat, reshape): no tensors of its own
        if isinstance(module, NORMS):
            role = "norm"
        pairs = members.setdefault((name, role), [])
        pairs.extend(zip(item.idxs, item.root_idxs, strict=True))
    out = [(n, r, tuple(sorted(set(p)))) for (n, r), p in members.items()]
    return out, bare


def traced_groups(model: nn.Module, example: Inputs,
                  skip: set[str]) -> tuple[list[RawGroup], list[tuple[str, str]]]:
    """DepGraph groups of ``model`` traced on ``example``, one per root layer (Conv,
    Linear, RNN) not in ``skip``; and ``(root, reason)`` for roots DepGraph failed on."""
    import torch_pruning as tp

    failed: list[tuple[str, str]] = []
    with warnings.catch_warnings(), _proxies(model) as stand_ins:
        warnings.simplefilter("ignore")
        names = {m: n for n, m in model.named_modules() if not isinstance(m, RNNProxy)}
        names.update(stand_ins)
        params = {id(p): n for n, p in model.named_parameters()}
        graph = tp.DependencyGraph().build_dependency(
            model, example_inputs=example, forward_fn=lambda m, x: inputs.call(m, x),
            verbose=False)
        groups: list[RawGroup] = []
        visited: set[nn.Module] = set()
        for module in list(graph.module2node):
            name = names.get(module)
            if not isinstance(module, ROOTS) or module in visited or name is None \
                    or name in skip:
                continue
            pruner = graph.get_pruner_of_module(module)
            size = pruner.get_out_channels(module) if pruner is not None else None
            if not size:
                continue
            try:
                group = graph.get_pruning_group(module, pruner.prune_out_channels,
                                                list(range(size)))
            except Exception as exc:  # torch-pruning cannot map this root's channels
                failed.append((name, f"torch-pruning could not trace it ({type(exc).__name__})"))
                continue
            members, bare = _members(group, names, params)
            visited |= {m for m, n in names.items()
                        if any(n == member and role == "out" for member, role, _ in members)}
            groups.append(RawGroup(name, size, tuple(members), tuple(bare)))
    return groups, failed
