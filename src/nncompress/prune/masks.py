"""Which weights can be pruned, and pruning masks: finding them (analysis) and applying
them (surgery) are separate steps (design principle 2).

:data:`PRUNABLE` is the one table mapping a layer type to the names of its own
parameters that connection pruning may zero (Han et al., 2015, prune the weight
matrices of fully connected, convolutional and recurrent layers; biases are kept;
embedding tables are pruned like any weight matrix).

:data:`GATES` names the gate blocks stacked in a recurrent weight matrix (PyTorch's
order: GRU ``r, z, n``; LSTM ``i, f, g, o``), and :func:`gate_blocks` cuts a parameter
into them, for per-gate reports (sparse VD) and per-gate codebooks (weight sharing).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from nncompress.errors import ModelError, UnsupportedLayerError

__all__ = [
    "GATES",
    "PRUNABLE",
    "Prunables",
    "apply_masks",
    "find_prunable",
    "gate_blocks",
    "mask_sparsity",
    "select",
    "selected_weights",
]

#: Layer type -> fnmatch patterns naming its *own* prunable parameters (first isinstance
#: match wins, so subclasses such as attention's out-projection Linear are covered).
#: An empty tuple marks a known type none of whose parameters are pruned (norm layers).
#: A module with parameters of its own whose type is not listed is reported, not pruned.
PRUNABLE: tuple[tuple[type[nn.Module], tuple[str, ...]], ...] = (
    (nn.Linear, ("weight",)),
    (nn.Bilinear, ("weight",)),
    (nn.Conv1d, ("weight",)),
    (nn.Conv2d, ("weight",)),
    (nn.Conv3d, ("weight",)),
    (nn.ConvTranspose1d, ("weight",)),
    (nn.ConvTranspose2d, ("weight",)),
    (nn.ConvTranspose3d, ("weight",)),
    # GRU / LSTM / RNN: every input-hidden, hidden-hidden (and LSTM projection) matrix.
    (nn.RNNBase, ("weight_ih_l*", "weight_hh_l*", "weight_hr_l*")),
    (nn.RNNCellBase, ("weight_ih", "weight_hh")),
    (nn.MultiheadAttention, ("in_proj_weight", "q_proj_weight", "k_proj_weight",
                             "v_proj_weight")),
    # lookup tables: [num_embeddings, embedding_dim]
    (nn.Embedding, ("weight",)),
    (nn.EmbeddingBag, ("weight",)),
    (nn.BatchNorm1d, ()),
    (nn.BatchNorm2d, ()),
    (nn.BatchNorm3d, ()),
    (nn.SyncBatchNorm, ()),
    (nn.InstanceNorm1d, ()),
    (nn.InstanceNorm2d, ()),
    (nn.InstanceNorm3d, ()),
    (nn.LayerNorm, ()),
    (nn.GroupNorm, ()),
    (nn.RMSNorm, ()),
)


#: Recurrent layer type -> its gate blocks, in the order PyTorch stacks them along dim 0
#: of every input-hidden and hidden-hidden matrix (first isinstance match wins).
GATES: tuple[tuple[type[nn.Module], tuple[str, ...]], ...] = (
    (nn.GRU, ("r", "z", "n")),
    (nn.GRUCell, ("r", "z", "n")),
    (nn.LSTM, ("i", "f", "g", "o")),
    (nn.LSTMCell, ("i", "f", "g", "o")),
    (nn.RNN, ("h",)),
    (nn.RNNCell, ("h",)),
)


def gate_blocks(module: nn.Module, param: str) -> tuple[tuple[str, slice], ...]:
    """``(gate name, row slice)`` per gate block of ``module``'s own parameter ``param``.

    ``weight_ih*`` / ``weight_hh*`` of a GRU / LSTM / RNN (or cell) are ``[G * hidden,
    cols]`` with G gates stacked along dim 0; an LSTM projection ``weight_hr*`` is one block
    named ``proj``. Any other parameter (or module type) is one block named ``""``.
    """
    rows = getattr(module, param).shape[0]
    if param.startswith(("weight_ih", "weight_hh")):
        for layer_type, gates in GATES:
            if isinstance(module, layer_type) and rows % len(gates) == 0:
                size = rows // len(gates)
                return tuple((g, slice(i * size, (i + 1) * size)) for i, g in enumerate(gates))
    if param.startswith("weight_hr") and isinstance(module, nn.RNNBase):
        return (("proj", slice(0, rows)),)
    return (("", slice(0, rows)),)


@dataclass(frozen=True)
class Prunables:
    """What connection pruning may touch in a model.

    ``names``: parameter names (as in ``model.named_parameters()``) of prunable weights, in
    model order. ``unsupported``: one line per parameter owned by a module type that
    :data:`PRUNABLE` does not know, e.g. ``"pos_embedding (Transformer)"``.
    """

    names: tuple[str, ...]
    unsupported: tuple[str, ...]


def _rule(module: nn.Module) -> tuple[str, ...] | None:
    for layer_type, patterns in PRUNABLE:
        if isinstance(module, layer_type):
            return patterns
    return None


def find_prunable(model: nn.Module) -> Prunables:
    """Walk every module's own parameters and sort them by the :data:`PRUNABLE` table."""
    names: list[str] = []
    unsupported: list[str] = []
    for prefix, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        patterns = _rule(module)
        # a subclass of a listed type whose own weights go by other names (e.g. the
        # buckets of a HashedLinear) has no rule that fits: it is reported, not skipped
        fits = patterns is not None and (not patterns or any(
            fnmatch.fnmatchcase(pname, p) for pname, _ in own for p in patterns))
        for pname, _ in own:
            full = f"{prefix}.{pname}" if prefix else pname
            if not fits:
                unsupported.append(f"{full} ({type(module).__name__})")
            elif any(fnmatch.fnmatchcase(pname, p) for p in (patterns or ())):
                names.append(full)
    return Prunables(tuple(names), tuple(unsupported))


def select(names: Sequence[str], include: Sequence[str], exclude: Sequence[str]) -> tuple[str, ...]:
    """The names matching any ``include`` and no ``exclude`` fnmatch pattern, in order.

    Raises ``ModelError`` naming an include pattern that matches none of ``names``.
    """
    for pattern in include:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            known = ", ".join(names) or "none"
            raise ModelError(f"layers pattern {pattern!r} matches no prunable weight; "
                             f"prunable: {known}")
    return tuple(n for n in names
                 if any(fnmatch.fnmatchcase(n, p) for p in include)
                 and not any(fnmatch.fnmatchcase(n, p) for p in exclude))


def selected_weights(model: nn.Module, include: Sequence[str],
                     exclude: Sequence[str]) -> tuple[str, ...]:
    """Names of the prunable weights of ``model`` chosen by ``include``/``exclude``.

    Raises ``UnsupportedLayerError`` when the model has no prunable weight at all (naming
    the parameters no rule covers) and ``ModelError`` when the patterns leave none.
    """
    found = find_prunable(model)
    if not found.names:
        raise UnsupportedLayerError(f"model {type(model).__name__} has no prunable weights; "
                                    f"parameters without a pruning rule: "
                                    f"{', '.join(found.unsupported) or 'none'}")
    names = select(found.names, include, exclude)
    if not names:
        raise ModelError(f"layers={list(include)} with exclude={list(exclude)} leaves no "
                         f"weight to prune; prunable: {', '.join(found.names)}")
    return names


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Zero every weight whose keep-mask entry is False, in place; return ``model``.

    ``masks`` maps parameter names to bool tensors of the parameter's shape.
    """
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            param = params.get(name)
            if param is None:
                raise ModelError(f"pruning mask for {name!r} matches no parameter of the model")
            if mask.shape != param.shape:
                raise ModelError(f"pruning mask for {name!r} has shape {tuple(mask.shape)}, "
                                 f"the parameter has {tuple(param.shape)}")
            param.masked_fill_(~mask.to(device=param.device, dtype=torch.bool), 0.0)
    return model


def mask_sparsity(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of masked-out (False) entries over all masks; 0.0 for no masks."""
    total = sum(m.numel() for m in masks.values())
    if total == 0:
        return 0.0
    kept = sum(int(m.sum()) for m in masks.values())
    return 1.0 - kept / total
